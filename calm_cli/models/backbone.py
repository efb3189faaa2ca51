"""A Llama decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases).

Attribute names follow Hugging Face's `LlamaModel`, so the authors' `transformer.*`
tensors load unchanged. The KV cache is preallocated once per generation (`KVCache`):
decode steps write into it in place, which keeps shapes static for torch.compile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import CALMConfig
from .layers import RMSNorm, SwiGLU


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for integer positions [B, L] -> each [B, 1, L, head_dim], in float32 as Llama does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos.to(x.dtype)) + (rotated * sin.to(x.dtype))


@dataclass
class KVCache:
    """Per-layer key and value buffers [B, kv_heads, max_len, head_dim] plus which slots hold real tokens."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    valid: torch.Tensor

    @classmethod
    def allocate(cls, config: CALMConfig, batch: int, max_len: int, device, dtype) -> KVCache:
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        n = config.num_hidden_layers
        return cls(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
            valid=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
        )

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]


class Attention(nn.Module):
    def __init__(self, config: CALMConfig) -> None:
        super().__init__()
        self.config = config
        h, hd = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, config.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(h, config.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(h, config.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * hd, h, bias=False)

    def forward(self, x, cos, sin, mask, cache: tuple[torch.Tensor, torch.Tensor] | None, start: int | torch.Tensor):
        b, length, _ = x.shape
        c = self.config
        q = self.q_proj(x).view(b, length, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, length, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, length, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cache_k, cache_v = cache
            if isinstance(start, torch.Tensor):  # one new input per row, each at its own slot start[b]
                index = start.view(b, 1, 1, 1).expand(b, k.shape[1], 1, k.shape[3])
                cache_k.scatter_(2, index, k)
                cache_v.scatter_(2, index, v)
            else:
                cache_k[:, :, start : start + length] = k
                cache_v[:, :, start : start + length] = v
            k, v = cache_k, cache_v
        groups = c.num_attention_heads // c.num_key_value_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1)
        elif length == 1:
            out = decode_attention(q, k, v, mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row, [B, heads, 1, D] over [B, heads, S, D], as plain products and a softmax.

    Not `scaled_dot_product_attention`: with more than one CPU thread its kernel splits the
    keys differently for another number of rows, so a row's output would depend on how many
    requests share the step (README "One engine"). Here every row and head is its own
    product, reduced over its own keys in the same order whatever the batch.
    """
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


class DecoderLayer(nn.Module):
    def __init__(self, config: CALMConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """`embed_tokens` belongs here because CALM builds its chunk inputs from these embeddings."""

    def __init__(self, config: CALMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """Final hidden states [B, L, H] for input vectors [B, L, H].

        Without a cache this is a plain causal pass. With one, the L new inputs are written at
        slots start..start+L-1 and attend to every valid earlier slot, so left-padded batches work.
        """
        b, length, _ = inputs_embeds.shape
        if positions is None:
            positions = torch.arange(start, start + length, device=inputs_embeds.device).expand(b, length)
        if cache is None:
            return self.run_layers(inputs_embeds, positions, None, [None] * len(self.layers), start)
        slots = torch.arange(cache.max_len, device=inputs_embeds.device)
        query_slots = (start + torch.arange(length, device=slots.device))[:, None]
        own = slots[None, :] == query_slots
        mask = ((slots[None, :] <= query_slots)[None] & (cache.valid[:, None, :] | own[None]))[:, None]
        return self.run_layers(inputs_embeds, positions, mask, list(zip(cache.keys, cache.values)), start)

    def decode(self, inputs_embeds: torch.Tensor, lengths: torch.Tensor, cache: KVCache, span: int) -> torch.Tensor:
        """One new input per row [B, 1, H], written at slot lengths[b] of row b's cache (its position).

        Rows are independent sequences that start at slot 0 with no padding, so a row's
        length is its position; attention reads slots 0..lengths[b] of the first `span`
        slots (a bound on every length, so short batches do not read the whole buffer).
        The first B rows of the cache are used.
        """
        b = inputs_embeds.shape[0]
        slots = torch.arange(span, device=inputs_embeds.device)
        mask = (slots[None, :] <= lengths[:, None])[:, None, None, :]
        caches = [(k[:b, :, :span], v[:b, :, :span]) for k, v in zip(cache.keys, cache.values)]
        return self.run_layers(inputs_embeds, lengths[:, None], mask, caches, lengths)

    def run_layers(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        caches: list[tuple[torch.Tensor, torch.Tensor] | None],
        start: int | torch.Tensor,
    ) -> torch.Tensor:
        """The layer loop, for callers with their own mask and key/value buffers (evaluation's tree pass).

        Each layer writes its new keys and values at slot `start` of its buffers and attends
        under `mask` (None: plain causal attention over the inputs alone).
        """
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
        for layer, layer_cache in zip(self.layers, caches):
            x = layer(x, cos, sin, mask, layer_cache, start)
        return self.norm(x)
