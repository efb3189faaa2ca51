"""BrierLM. Imports models, io and runtime."""
