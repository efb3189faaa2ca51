"""The `calm` command line: one module per command group, a thin layer over the Python API."""
