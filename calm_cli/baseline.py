"""The token-level Transformer baseline: CALM's backbone predicting one token at a time.

It reuses `CALMConfig` with `patch_size` 1 (the latent, noise and head fields are unused)
so that the baseline and CALM differ only in what the backbone reads and predicts. The
output matrix `lm_head` is untied from `transformer.embed_tokens`.
Saved in our layout with config.json "architectures": ["TokenTransformer"].
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbone import Backbone, KVCache
from .checkpoint import load_weights, read_state_dict, write_directory
from .config import CALMConfig, config_from_dict, config_to_dict, read_json
from .errors import CalmError, UsageError
from .tokenizer import load_tokenizer, vocab_size as tokenizer_vocab_size

ARCHITECTURE = "TokenTransformer"


class TokenTransformer(nn.Module):
    def __init__(self, config: CALMConfig) -> None:
        super().__init__()
        if config.patch_size != 1:
            raise CalmError(f"a token-level model needs patch_size 1, not {config.patch_size}")
        self.config = config
        self.transformer = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tokenizer = None

    @property
    def patch_size(self) -> int:
        return 1

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full causal pass: token ids [B, L] -> next-token logits [B, L, V]."""
        return self.lm_head(self.transformer(self.transformer.embed_tokens(input_ids)))

    def step(self, input_ids: torch.Tensor, cache: KVCache, start: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Cached pass over new tokens written at cache slot `start`: [B, L] ids -> logits [B, L, V].

        As with `CALM.step`, the caller marks the slots it writes (real tokens, not padding) in
        `cache.valid` before the call.
        """
        hidden = self.transformer(self.transformer.embed_tokens(input_ids), positions=positions, cache=cache, start=start)
        return self.lm_head(hidden)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = next(self.parameters())
        return KVCache.allocate(self.config, batch, max_len, p.device, p.dtype)

    def parameter_counts(self) -> dict[str, int]:
        def count(m: nn.Module) -> int:
            return sum(t.numel() for t in m.parameters())

        return {"backbone": count(self.transformer), "lm_head": count(self.lm_head)}


def is_baseline(config: dict[str, Any]) -> bool:
    """True for a config.json written by `save_baseline`."""
    return ARCHITECTURE in (config.get("architectures") or [])


def is_baseline_dir(directory: Path) -> bool:
    """True for a model directory written by `save_baseline` (False when it has no config.json)."""
    return (directory / "config.json").is_file() and is_baseline(read_json(directory / "config.json"))


def save_baseline(model: TokenTransformer, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write config.json, model.safetensors and tokenizer.json atomically (see `write_directory`)."""
    target = Path(directory).expanduser()
    config = config_to_dict(model.config)
    config.pop("ae_path", None)
    config["architectures"] = [ARCHITECTURE]
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    write_directory(target, config, state, model.tokenizer)
    return target


def load_baseline(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    tokenizer: str | None = None,
) -> TokenTransformer:
    """Load a `save_baseline` directory ready for inference (eval mode, no gradients)."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise UsageError(f"{directory}: no such model directory")
    raw = read_json(directory / "config.json")
    if not is_baseline(raw):
        raise CalmError(f"{directory}: config.json does not describe a {ARCHITECTURE} model")
    model = TokenTransformer(config_from_dict(CALMConfig, raw, str(directory / "config.json")))
    tensors, _ = read_state_dict(directory)
    load_weights(model, tensors, str(directory))
    tok_path = Path(tokenizer).expanduser() if tokenizer else directory / "tokenizer.json"
    if tok_path.exists():
        model.tokenizer = load_tokenizer(tok_path)
        if tokenizer_vocab_size(model.tokenizer) > model.config.vocab_size:
            raise CalmError(f"{tok_path}: tokenizer has more tokens than the model's vocabulary {model.config.vocab_size}")
    elif tokenizer:
        raise UsageError(f"{tokenizer}: no such tokenizer file")
    model.eval().requires_grad_(False)
    return model.to(device=device, dtype=dtype)
