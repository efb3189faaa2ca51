"""Decoding: the engine, temperature sampling, candidate decoding and text streaming. Imports models and io."""
