"""The dtype of the candidate path: the head's draws and the autoencoder decoder's hidden layers.

At T < 1 every step draws N = 200 latents from the energy head and decodes each into K
final decoder states; in float32 on one CPU core those two take about 20 ms of a 30 ms
step, while the same matmuls in bf16 run 4-5 times faster (AVX512-BF16 or AMX on CPU,
tensor cores on CUDA). So by default a float32 model runs that path in bf16 copies of the
head and of the decoder's layers, wherever the device has bf16 matmuls.

What stays exact: the vocabulary argmax of each candidate. The decoder's final states are
taken to float32 and `FastCandidateDecoder` (or the dense path) returns the float32 argmax
of W h for those states, certificate and all. What changes: the latents and the states are
those of the bf16 head and layers, so the sampler draws from a slightly different model
(README "Candidate precision" and benchmarks/candidate_precision.py give the measured
distance to the float32 path). `--candidate-dtype float32` keeps the float32 path.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import UsageError
from ..models.autoencoder import Decoder

CANDIDATE_DTYPES = {"auto": None, "float32": torch.float32, "bf16": torch.bfloat16}


def check_candidate_dtype(name: str) -> None:
    if name not in CANDIDATE_DTYPES:
        raise UsageError(f"--candidate-dtype must be auto, float32 or bf16, got '{name}'")


def has_fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run at a native rate here: CUDA with bf16, or a CPU with AVX512-BF16 / AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_candidate_dtype(name: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the candidate path runs in. auto: bf16 for a float32 model where bf16 is fast, else the model's."""
    check_candidate_dtype(name)
    wanted = CANDIDATE_DTYPES[name]
    if wanted is not None:
        return wanted
    return torch.bfloat16 if model_dtype == torch.float32 and has_fast_bf16(device) else model_dtype


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
