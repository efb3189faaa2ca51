"""The energy-based generative head: hidden state + uniform noise -> one latent vector.

One forward pass per sample, no iteration: noise and hidden state are embedded and
normalised, then `num_mlp_layers` residual blocks refine the noise stream conditioned on
the hidden state, and a final block projects to `latent_size`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CALMConfig

LN_EPS = 1e-6


class MLPBlock(nn.Module):
    """x + down(silu(gate) * up), with [gate, up] from an MLP over LayerNorm(x) || y."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(size, eps=LN_EPS)
        self.linears = nn.Sequential(
            nn.Linear(2 * size, size), nn.SiLU(), nn.Linear(size, size), nn.SiLU(), nn.Linear(size, 2 * size)
        )
        self.down_proj = nn.Linear(size, size)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gate, up = self.linears(torch.cat([self.in_ln(x), y], dim=-1)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class FinalLayer(nn.Module):
    def __init__(self, size: int, out_size: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(size, eps=LN_EPS)
        self.linears = nn.Sequential(nn.Linear(size, size), nn.SiLU(), nn.Linear(size, out_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linears(self.in_ln(x))


class GenerativeHead(nn.Module):
    def __init__(self, config: CALMConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.noise_size = config.noise_size
        self.noise_embd = nn.Linear(config.noise_size, h)
        self.hidden_embd = nn.Linear(h, h)
        self.norm_noise = nn.LayerNorm(h, eps=LN_EPS)
        self.norm_hidden = nn.LayerNorm(h, eps=LN_EPS)
        self.mlp_blocks = nn.ModuleList(MLPBlock(h) for _ in range(config.num_mlp_layers))
        self.final_layer = FinalLayer(h, config.latent_size)

    def forward(self, hidden: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] and noise [..., noise_size] (broadcastable) -> latents [..., latent]."""
        x = self.norm_noise(self.noise_embd(noise))
        y = self.norm_hidden(self.hidden_embd(hidden))
        x, y = torch.broadcast_tensors(x, y)
        for block in self.mlp_blocks:
            x = block(x, y)
        return self.final_layer(x)

    def sample(self, hidden: torch.Tensor, num: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw latents: [..., H] -> [..., latent], or [..., num, latent] with fresh noise in [-0.5, 0.5)."""
        shape = hidden.shape[:-1] + ((num,) if num is not None else ())
        noise = torch.rand(*shape, self.noise_size, generator=generator, device=hidden.device, dtype=hidden.dtype) - 0.5
        if num is not None:
            hidden = hidden.unsqueeze(-2)
        return self(hidden, noise)
