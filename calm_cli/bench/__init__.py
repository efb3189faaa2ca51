"""`calm bench`: measuring the engine and reporting. Imports models, io and runtime."""
