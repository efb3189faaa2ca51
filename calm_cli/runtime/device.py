"""Where and in what precision a model runs: --device and --dtype as torch objects."""

from __future__ import annotations

import torch

from ..errors import UsageError


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return device


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UsageError(f"unknown dtype '{name}' (use fp32, bf16 or fp16)")
    return DTYPES[name]



def bind_thread(device: torch.device) -> None:
    """Make `device` the calling thread's current CUDA device; a no-op elsewhere.

    CUDA's current device is per thread and a new thread starts on device 0, so a thread
    that runs a model on cuda:1 without this launches on device 0's context and stream.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)


STICKY_CUDA_ERRORS = ("CUDA error", "device-side assert", "illegal memory access", "unspecified launch failure",
                      "illegal instruction", "misaligned address")


def device_failure(exc: BaseException) -> str | None:
    """The reason, when `exc` is a CUDA error that poisons the whole context; None otherwise.

    After a device-side assert or an illegal address every later kernel in the process
    fails too, so an engine that hit one cannot serve again. Running out of memory is not
    such an error: the allocator recovers, and the next smaller step can run.
    """
    if not isinstance(exc, RuntimeError) or isinstance(exc, torch.OutOfMemoryError):
        return None
    message = str(exc)
    if "out of memory" in message or not any(marker in message for marker in STICKY_CUDA_ERRORS):
        return None
    return f"{type(exc).__name__}: {message.strip().splitlines()[0]}"
