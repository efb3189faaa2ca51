"""calm: run, train, evaluate and benchmark CALM (Continuous Autoregressive Language Models)."""

import warnings

# torch warns at import when numpy is absent; calm never needs numpy at run time.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

from .io.checkpoint import load_autoencoder, load_model, save_model
from .runtime.engine import Engine, GenerationSettings, GenerationStats
from .runtime.text import generate, stream_text

__all__ = [
    "Engine",
    "GenerationSettings",
    "GenerationStats",
    "generate",
    "load_autoencoder",
    "load_model",
    "save_model",
    "stream_text",
]
__version__ = "0.1.0"
