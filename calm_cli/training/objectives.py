"""What each model kind minimises: the objectives the training loop wraps, and fresh models.

An objective is an nn.Module whose forward gives the training loss, so DDP and FSDP2 can
wrap it, plus an `evaluate` for held-out metrics and the writers of its checkpoint files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..eval.brier import brier_from_samples
from ..io.checkpoint import TIED_AE_KEY, FileWriter, baseline_files, calm_files, model_files
from ..models.autoencoder import Autoencoder
from ..models.baseline import TokenTransformer
from ..models.calm import CALM
from ..models.config import AutoencoderConfig, CALMConfig, config_to_dict

DISTANCE_EPS = 1e-12  # keeps the gradient of ||a - b||^beta finite when two vectors coincide

def _powered_distance(sq: torch.Tensor, beta: float) -> torch.Tensor:
    return sq.clamp_min(DISTANCE_EPS).pow(beta / 2)


def energy_loss(pred: torch.Tensor, target: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Energy-score loss per position: 2 E||x - y||^beta - E_{i != j}||x_i - x_j||^beta.

    pred [..., N, D] are model samples (N >= 2), target [..., M, D] samples of the truth;
    returns [...]. Minimised in expectation when the model's distribution is the truth's.
    """
    n = pred.shape[-2]
    if n < 2:
        raise ValueError("energy_loss needs at least two predictions per position")
    # fp32 even under autocast: the expansion below cancels badly in bf16.
    with torch.autocast(pred.device.type, enabled=False):
        pred, target = pred.float(), target.float()
        # ||x||^2 + ||y||^2 - 2 x.y avoids an [..., N, M, D] difference tensor.
        cross = pred.pow(2).sum(-1)[..., :, None] + target.pow(2).sum(-1)[..., None, :] - 2 * pred @ target.transpose(-1, -2)
        fit = _powered_distance(cross, beta).mean((-2, -1))
        i, j = torch.triu_indices(n, n, 1, device=pred.device)
        spread = _powered_distance((pred[..., i, :] - pred[..., j, :]).pow(2).sum(-1), beta).mean(-1)
    return 2 * fit - spread


def _randn_like(x: torch.Tensor, generator: torch.Generator, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    return torch.randn(shape or x.shape, generator=generator, device=x.device, dtype=x.dtype)


class AutoencoderObjective(nn.Module):
    """The robust VAE loss: masked inputs, posterior sample, latent dropout, clamped KL."""

    def __init__(self, model: Autoencoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.model.config
        p = c.ae_dropout
        keep = torch.rand(ids.shape, generator=gen, device=ids.device) >= p
        mean, log_std = self.model.encode(torch.where(keep, ids, torch.zeros_like(ids)))
        z = mean + log_std.exp() * _randn_like(mean, gen)
        if p > 0:
            z = z * (torch.rand(z.shape, generator=gen, device=z.device) >= p).to(z.dtype) / (1 - p)
        logits = self.model.decode(z).float()
        ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
        mean, log_std = mean.float(), log_std.float()
        kl = (0.5 * (mean.pow(2) + (2 * log_std).exp() - 1 - 2 * log_std)).clamp_min(c.kl_clamp).sum(-1).mean()
        loss = ce * c.patch_size + c.kl_weight * kl
        return loss, {"ce": ce.detach(), "kl": kl.detach(), "acc": (logits.argmax(-1) == ids).float().mean()}

    @torch.no_grad()
    def evaluate(self, ids: torch.Tensor, gen: torch.Generator) -> dict[str, float]:
        """Reconstruction from the posterior mean, the latent CALM is trained to predict."""
        mean, _ = self.model.encode(ids)
        logits = self.model.decode(mean).float()
        ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
        return {"ce": ce.item(), "acc": (logits.argmax(-1) == ids).float().mean().item()}

    def trainable(self) -> nn.Module:
        return self.model

    def files(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, FileWriter]:
        """The autoencoder's checkpoint files (its tied head is not stored twice); `state`: gathered full weights."""
        config = config_to_dict(self.model.config)
        config["architectures"] = ["Autoencoder"]
        state = {k: v.contiguous().cpu() for k, v in (self.model.state_dict() if state is None else state).items() if k != TIED_AE_KEY}
        return model_files(config, state, getattr(self.model, "tokenizer", None))


class CALMObjective(nn.Module):
    """Energy score between head samples and the frozen autoencoder's posterior of the next chunk."""

    def __init__(self, model: CALM, target_samples: int) -> None:
        super().__init__()
        self.model = model
        self.target_samples = target_samples
        model.ae_model.requires_grad_(False)

    def _hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Position t (having read chunks 0..t) predicts chunk t + 1: drop the last position."""
        return self.model.backbone_hidden(ids)[:, :-1]

    def _loss(self, ids: torch.Tensor, hidden: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            mean, log_std = (t[:, 1:].float() for t in self.model.ae_model.encode(ids))
        pred = self.model.generative_head.sample(hidden, self.model.config.num_samples, gen)
        shape = (*mean.shape[:-1], self.target_samples, mean.shape[-1])
        target = mean.unsqueeze(-2) + log_std.exp().unsqueeze(-2) * _randn_like(mean, gen, shape)
        return energy_loss(pred, target, self.model.config.beta).mean()

    def forward(self, ids: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._loss(ids, self._hidden(ids), gen), {}

    @torch.no_grad()
    def evaluate(self, ids: torch.Tensor, gen: torch.Generator) -> dict[str, float]:
        """Energy loss, and BrierLM from two head samples per position decoded by the autoencoder."""
        hidden = self._hidden(ids)
        result = {"energy": self._loss(ids, hidden, gen).item()}
        chunks = self.model.ae_model.decode_tokens(self.model.generative_head.sample(hidden, 2, gen))
        truth = ids.reshape(ids.shape[0], -1, self.model.patch_size)[:, 1:]
        scores = brier_from_samples(chunks[..., 0, :], chunks[..., 1, :], truth)
        result.update({k: v for k, v in scores.items() if k.startswith("brier") and k != "brierlm"})
        return result

    def trainable(self) -> nn.Module:
        return nn.ModuleList([self.model.transformer, self.model.embed_proj, self.model.generative_head])

    def files(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, FileWriter]:
        return calm_files(self.model, state=state)


class BaselineObjective(nn.Module):
    """Next-token cross-entropy."""

    def __init__(self, model: TokenTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.model(ids[:, :-1]).float()
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        return loss, {}

    @torch.no_grad()
    def evaluate(self, ids: torch.Tensor, gen: torch.Generator) -> dict[str, float]:
        logits = self.model(ids[:, :-1]).float()
        ce = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        return {"ce": ce.item(), "acc": (logits.argmax(-1) == ids[:, 1:]).float().mean().item()}

    def trainable(self) -> nn.Module:
        return self.model

    def files(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, FileWriter]:
        return baseline_files(self.model, state=state)


# ---------------------------------------------------------------------------------------
# Building, initialising and loading models
# ---------------------------------------------------------------------------------------


def init_weights(module: nn.Module) -> None:
    """normal(0, 0.02) for linear and embedding weights, zero biases (norms keep their ones/zeros)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def build_model(kind: str, config: AutoencoderConfig | CALMConfig, autoencoder: Autoencoder | None = None) -> nn.Module:
    """A freshly initialised model (seed torch first for reproducibility)."""
    if kind == "autoencoder":
        model: nn.Module = Autoencoder(config)
        init_weights(model)
    elif kind == "baseline":
        model = TokenTransformer(config)
        init_weights(model)
    else:
        if autoencoder is None:
            raise UsageError("training CALM needs a trained autoencoder (--ae DIR)")
        ae_config = autoencoder.config
        if (config.patch_size, config.latent_size, config.vocab_size) != (ae_config.patch_size, ae_config.latent_size, ae_config.vocab_size):
            raise UsageError("the CALM config's patch_size, latent_size and vocab_size must match the autoencoder's")
        model = CALM(config, autoencoder.float().eval())
        for part in (model.transformer, model.embed_proj, model.generative_head):
            init_weights(part)
        # The head starts by predicting zeros, as the authors initialise it.
        final = model.generative_head.final_layer.linears[-1]
        nn.init.zeros_(final.weight)
        nn.init.zeros_(final.bias)
    return model

