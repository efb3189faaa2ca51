"""calm: run, train, evaluate and benchmark CALM (Continuous Autoregressive Language Models).

The public API. Names load on first use, so `import calm_cli` (and `calm --help`) does not import torch.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

# torch warns at import when numpy is absent; calm never needs numpy at run time.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

__version__ = "0.2.0"

_EXPORTS = {
    "load": "io.checkpoint",
    "load_model": "io.checkpoint",
    "load_autoencoder": "io.checkpoint",
    "load_baseline": "io.checkpoint",
    "save_model": "io.checkpoint",
    "list_models": "io.registry",
    "resolve_model": "io.registry",
    "Engine": "runtime.engine",
    "Request": "runtime.engine",
    "GenerationSettings": "runtime.settings",
    "GenerationStats": "runtime.text",
    "TextStream": "runtime.text",
    "generate": "runtime.text",
    "stream_text": "runtime.text",
    "temperature_sample": "runtime.sampling",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'calm_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
