"""Model definitions only: the CALM parts and the token-level baseline. Imports nothing above it."""
