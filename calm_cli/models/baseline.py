"""The token-level Transformer baseline: CALM's backbone predicting one token at a time.

It reuses `CALMConfig` with `patch_size` 1 (the latent, noise and head fields are unused)
so that the baseline and CALM differ only in what the backbone reads and predicts. The
output matrix `lm_head` is untied from `transformer.embed_tokens`.
Saved in our layout with config.json "architectures": ["TokenTransformer"] (see io/checkpoint.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CalmError
from .backbone import Backbone, KVCache
from .config import CALMConfig

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
