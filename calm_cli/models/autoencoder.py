"""The CALM autoencoder: K tokens <-> one latent vector (a small VAE of per-token MLPs).

Encoder: embed -> first half of the residual MLP layers per token -> concatenate the K
token states -> `squeeze_layer` -> second half -> RMSNorm -> `hidden_to_latent` giving
mean || log-std. The decoder mirrors it with `latent_to_hidden` and `expand_layer`; its
output matrix is the encoder's token embedding (tied). Each stage runs
`num_layers // 2` layers, as the authors' code does, so an odd last layer is unused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import AutoencoderConfig
from .layers import RMSNorm, SwiGLU


class ResidualMLP(nn.Module):
    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.layernorm(x))


class Encoder(nn.Module):
    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        h, k = config.hidden_size, config.patch_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.encoder_layers = nn.ModuleList(ResidualMLP(config) for _ in range(config.num_encoder_layers))
        self.squeeze_layer = nn.Linear(k * h, h)
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.hidden_to_latent = nn.Linear(h, 2 * config.latent_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids (L a multiple of K) -> [B, L/K, 2 * latent] (mean || log-std)."""
        b, length = input_ids.shape
        k, half = self.config.patch_size, self.config.num_encoder_layers // 2
        x = self.embed_tokens(input_ids)
        for layer in self.encoder_layers[:half]:
            x = layer(x)
        x = self.squeeze_layer(x.reshape(b, length // k, k * x.shape[-1]))
        for layer in self.encoder_layers[half : 2 * half]:
            x = layer(x)
        return self.hidden_to_latent(self.norm(x))


class Decoder(nn.Module):
    def __init__(self, config: AutoencoderConfig, lm_head_weight: nn.Parameter) -> None:
        super().__init__()
        self.config = config
        h, k = config.hidden_size, config.patch_size
        self.latent_to_hidden = nn.Linear(config.latent_size, h)
        self.decoder_layers = nn.ModuleList(ResidualMLP(config) for _ in range(config.num_decoder_layers))
        self.expand_layer = nn.Linear(h, k * h)
        self.norm = RMSNorm(h, config.rms_norm_eps)
        self.lm_head_weight = lm_head_weight

    def hidden(self, latents: torch.Tensor) -> torch.Tensor:
        """[..., P, latent] -> final token states [..., P * K, H], before the output matrix."""
        k, half = self.config.patch_size, self.config.num_decoder_layers // 2
        x = self.latent_to_hidden(latents)
        for layer in self.decoder_layers[:half]:
            x = layer(x)
        x = self.expand_layer(x)
        x = x.reshape(*x.shape[:-2], x.shape[-2] * k, x.shape[-1] // k)
        for layer in self.decoder_layers[half : 2 * half]:
            x = layer(x)
        return self.norm(x)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return F.linear(self.hidden(latents), self.lm_head_weight)


class Autoencoder(nn.Module):
    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config, self.encoder.embed_tokens.weight)
        self.tokenizer = None

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def encode(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, L] -> (mean, log_std), each [B, L/K, latent]."""
        out = self.encoder(input_ids)
        return out.chunk(2, dim=-1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, P, latent] -> logits [B, P * K, vocab]."""
        return self.decoder(latents)

    def decode_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [..., latent] -> argmax chunks [..., K]; the one function candidate decoding goes through."""
        hidden = self.decoder.hidden(latents.unsqueeze(-2))
        return F.linear(hidden, self.decoder.lm_head_weight).argmax(-1)
