"""calm: run, train, evaluate and benchmark CALM (Continuous Autoregressive Language Models)."""

from .checkpoint import load_autoencoder, load_model, save_model
from .engine import Engine, GenerationSettings, GenerationStats
from .generation import generate, stream_text

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
