"""Model configurations, read from the authors' config.json files.

Field names follow the authors' `AutoencoderConfig` and `CALMConfig` so that their
config.json files load unchanged and ours stay readable by their code.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CalmError


@dataclass
class AutoencoderConfig:
    vocab_size: int = 128256
    patch_size: int = 4
    hidden_size: int = 512
    intermediate_size: int = 1280
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    latent_size: int = 128
    rms_norm_eps: float = 1e-6
    ae_dropout: float = 0.15
    kl_clamp: float = 0.5
    kl_weight: float = 1e-3
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class CALMConfig:
    vocab_size: int = 128256
    patch_size: int = 4
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    latent_size: int = 128
    noise_size: int = 64
    num_mlp_layers: int = 4
    num_samples: int = 8
    beta: float = 1.0
    ae_path: str | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads:
            raise CalmError(
                f"config: hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise CalmError("config: num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def config_from_dict(cls: type, data: dict[str, Any], source: str = "config.json"):
    """Build `cls` from a JSON dict, keeping unknown keys in `.extra` so we can write them back."""
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {k: v for k, v in data.items() if k in names}
    extra = {k: v for k, v in data.items() if k not in names}
    for f in dataclasses.fields(cls):
        if f.name in ("hidden_size", "vocab_size", "patch_size", "latent_size") and f.name not in known:
            raise CalmError(f"{source}: missing required field '{f.name}'")
    for f in dataclasses.fields(cls):
        if f.name in known:
            _check_field(f.name, str(f.type), known[f.name], source)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if known.get(name) is not None and known[name] >= known.get("vocab_size", 0) > 0:
            raise CalmError(f"{source}: {name} {known[name]} is outside the vocabulary of {known['vocab_size']}")
    try:
        return cls(**known, extra=extra)
    except TypeError as exc:
        raise CalmError(f"{source}: {exc}") from None


LAYER_COUNTS = ("num_encoder_layers", "num_decoder_layers", "num_hidden_layers", "num_mlp_layers")
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def _check_field(name: str, kind: str, value: Any, source: str) -> None:
    """A JSON value of the field's type and range, so a bad config.json is a one-line error, not a crash later."""
    if value is None and "None" in kind:
        return
    if kind.startswith("int"):
        low = 0 if name in LAYER_COUNTS + TOKEN_IDS else 1
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value < 2**31:
            raise CalmError(f"{source}: '{name}' must be a whole number from {low} to 2^31 - 1, got {json.dumps(value)[:40]}")
    elif kind.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CalmError(f"{source}: '{name}' must be a finite number, got {json.dumps(value)[:40]}")
    elif kind.startswith("str") and not isinstance(value, str):
        raise CalmError(f"{source}: '{name}' must be a string, got {json.dumps(value)[:40]}")


def config_to_dict(config) -> dict[str, Any]:
    data = {k: v for k, v in dataclasses.asdict(config).items() if k != "extra"}
    return {**config.extra, **data}


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise CalmError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise CalmError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise CalmError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise CalmError(f"{path}: expected a JSON object")
    return data
