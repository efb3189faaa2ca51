"""CALM: a Llama backbone over chunk vectors, an energy head, and a frozen autoencoder.

Attribute names match the authors' `EnergyTransformer` (`transformer`, `embed_proj`,
`generative_head`, `ae_model`) so their state dicts load as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from .autoencoder import Autoencoder
from .backbone import Backbone, KVCache
from .config import AutoencoderConfig, CALMConfig
from .head import LN_EPS, GenerativeHead


class CALM(nn.Module):
    def __init__(self, config: CALMConfig, autoencoder: Autoencoder | AutoencoderConfig) -> None:
        """`autoencoder` is a trained one to use as it is, or a config to build a fresh one from."""
        super().__init__()
        self.config = config
        h, k = config.hidden_size, config.patch_size
        self.transformer = Backbone(config)
        self.embed_proj = nn.Sequential(
            nn.Linear(k * h, 2 * h), nn.SiLU(), nn.Linear(2 * h, h), nn.LayerNorm(h, eps=LN_EPS)
        )
        self.generative_head = GenerativeHead(config)
        self.ae_model = autoencoder if isinstance(autoencoder, Autoencoder) else Autoencoder(autoencoder)
        self.tokenizer = None

    @property
    def ae_config(self) -> AutoencoderConfig:
        return self.ae_model.config

    @property
    def autoencoder(self) -> Autoencoder:
        return self.ae_model

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def embed_chunks(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] (L a multiple of K) -> one backbone input vector per chunk [B, L/K, H]."""
        b, length = input_ids.shape
        k = self.config.patch_size
        emb = self.transformer.embed_tokens(input_ids)
        return self.embed_proj(emb.reshape(b, length // k, k * emb.shape[-1]))

    def backbone_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full causal pass, no cache: [B, L] token ids -> [B, L/K, H] hidden states."""
        return self.transformer(self.embed_chunks(input_ids))

    def step(self, input_ids: torch.Tensor, cache: KVCache, start: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Cached pass over new chunks written at cache slot `start`: [B, C*K] ids -> [B, C, H]."""
        return self.transformer(self.embed_chunks(input_ids), positions=positions, cache=cache, start=start)

    def new_cache(self, batch: int, max_chunks: int) -> KVCache:
        p = next(self.parameters())
        return KVCache.allocate(self.config, batch, max_chunks, p.device, p.dtype)

    def parameter_counts(self) -> dict[str, int]:
        def count(m: nn.Module) -> int:
            return sum(t.numel() for t in m.parameters())

        return {
            "backbone": count(self.transformer),
            "embed_proj": count(self.embed_proj),
            "generative_head": count(self.generative_head),
            "autoencoder": count(self.ae_model),
        }
