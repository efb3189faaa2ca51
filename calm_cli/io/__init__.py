"""Checkpoints, tokenizers, token files and atomic writes. Imports models."""
