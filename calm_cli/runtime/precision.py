"""The dtype of the candidate path: the head's draws and the autoencoder decoder's hidden layers.

At T < 1 every step draws a pool of N = 200 latents from the energy head and decodes each
into K final decoder states; in float32 on one CPU core those two are most of a step
(default model: 9.6 + 11 ms), while the same matmuls in bf16 run 4-5 times faster
(AVX512-BF16 or AMX on CPU, tensor cores on CUDA). So by default (`auto`) a float32 model draws and decodes its pools
with bf16 copies of the head and of the decoder's layers, wherever the device has fast bf16
matmuls. A T = 1 step draws a single candidate: there bf16 matrix-vector products gain
nothing (on CPU they are slower), so `auto` keeps T = 1 in the model's dtype and its
output exactly as before. A request's path depends on its own temperature only, so its
tokens still depend only on its prompt, settings and seed.

What stays exact: the vocabulary argmax of each candidate. The decoder's final states are
taken to float32 and `FastCandidateDecoder` (or the dense path) returns the float32 argmax
of W h for those states, certificate and all. What changes: the latents and the states are
those of the bf16 head and layers, so the sampler draws from a slightly different model
(README "Candidate precision" and benchmarks/candidate_precision.py give the measured
distance to the float32 path). `--candidate-dtype float32` keeps everything in float32;
`bf16` uses bf16 at T = 1 too.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..models.autoencoder import Decoder
from ..models.calm import CALM
from .fastdecode import FastCandidateDecoder, dense_argmax
from .rng import RowRandom
from .settings import check_candidate_dtype

DTYPES = {"auto": None, "float32": torch.float32, "bf16": torch.bfloat16}


def has_fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run at a native rate here: CUDA with native bf16 (emulated is slower), or a CPU with AVX512-BF16 / AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    flags = _cpu_flags()
    if flags is not None:  # oneDNN also reports bf16 on AVX512 CPUs that only emulate it, slower than float32
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), else None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def candidate_dtypes(name: str, model_dtype: torch.dtype, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """The dtypes of (pools at T < 1, single draws at T = 1).

    auto: bf16 pools for a float32 model where bf16 is fast, single draws in the model's dtype;
    float32 or bf16: that dtype for both.
    """
    check_candidate_dtype(name)
    wanted = DTYPES[name]
    if wanted is not None:
        return wanted, wanted
    pool = torch.bfloat16 if model_dtype == torch.float32 and has_fast_bf16(device) else model_dtype
    return pool, model_dtype


def cast_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module` itself when it already has `dtype`, else a copy in `dtype` (the original is untouched)."""
    if next(module.parameters()).dtype == dtype:
        return module
    return copy.deepcopy(module).to(dtype)


def decoder_layers(decoder: Decoder, dtype: torch.dtype) -> Decoder:
    """A decoder for `Decoder.hidden` in `dtype`: its layers copied, the output matrix (shared, large) left out."""
    if decoder.lm_head_weight.dtype == dtype:
        return decoder
    layers = Decoder(decoder.config, None)
    own = {name: value for name, value in decoder.state_dict().items() if name != "lm_head_weight"}
    layers.load_state_dict(own)
    return layers.to(device=decoder.lm_head_weight.device, dtype=dtype).eval()


class CandidatePath:
    """The head's draws and the decoder's final states in one dtype, and the chunks they decode to.

    Copies in another dtype are taken once: after changing the model's weights, build a new runner.
    """

    def __init__(self, model: CALM, dtype: torch.dtype, candidate_decoder: str) -> None:
        self.dtype, self.noise_size = dtype, model.config.noise_size
        self.head = cast_copy(model.generative_head, dtype)
        self.decoder = decoder_layers(model.ae_model.decoder, dtype)
        self.weight = model.ae_model.decoder.lm_head_weight
        # Both give the same chunks (calm_cli/runtime/fastdecode.py); dense is kept for comparison.
        fast = FastCandidateDecoder(model.ae_model, self.states) if candidate_decoder == "fast" else None
        self.decode_chunks = fast or self._dense_chunks

    def latents(self, hidden: Tensor, rng: RowRandom, n: int) -> Tensor:
        """n head draws per row [R, n, latent] in this dtype, the noise from each row's own stream."""
        noise = rng.uniform((hidden.shape[0], n, self.noise_size), dtype=hidden.dtype) - 0.5
        return self.head(hidden.unsqueeze(-2).to(self.dtype), noise.to(self.dtype))

    def states(self, latents: Tensor) -> Tensor:
        """Latents [..., P, latent] -> final decoder states [..., P * K, H], in the output matrix's dtype."""
        return self.decoder.hidden(latents.to(self.dtype)).to(self.weight.dtype)

    def _dense_chunks(self, latents: Tensor) -> Tensor:
        """Latents [..., latent] -> argmax chunks [..., K] over the whole vocabulary, in IEEE float32 whatever the user set.

        Decoded in row slices within the device's logit budget (calm_cli/runtime/budget.py).
        """
        states = self.states(latents.unsqueeze(-2))
        return dense_argmax(states.reshape(-1, states.shape[-1]), self.weight).reshape(states.shape[:-1])
