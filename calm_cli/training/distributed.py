"""Several processes, one model: torchrun set-up, DDP or FSDP2, the global batch and full checkpoints.

World-size invariance is the design rule: `--batch-size` is the global batch, drawn from
generators that know nothing of ranks, and rank r trains on its slice of it, so N ranks x
B/N blocks and one rank x B blocks read the same blocks in the same order, average the same
gradients and (for a model without training noise) reach the same weights. Checkpoints hold
full, unsharded weights and an optimizer state keyed by parameter name, so a run resumes
on any number of processes, sharded or not.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UsageError
from ..models.autoencoder import ResidualMLP
from ..models.backbone import DecoderLayer

SHARDED_LAYERS = (DecoderLayer, ResidualMLP)  # the Transformer (and autoencoder) layers FSDP2 shards one by one


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> Ranks:
    """This process's rank and world size as torchrun announces them, readable before any set-up."""
    return Ranks(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))


def setup(device: str | None) -> tuple[Ranks, torch.device]:
    """One process per device under torchrun (WORLD_SIZE > 1); otherwise a plain single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if world == 1:
        return Ranks(), torch.device(device or ("cuda" if cuda else "cpu"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    local = torch.device("cpu")
    if cuda:
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(local)
    return Ranks(dist.get_rank(), world), local


def teardown(ranks: Ranks, finished: bool = True) -> None:
    """Leave the process group. After a run that finished, every rank first waits for the others
    (rank 0 may still be writing its checkpoint): a rank that tore gloo down under a peer's work
    could abort at exit ("terminate called without an active exception"). After an error no
    rank waits, since the others may never arrive."""
    if ranks.world > 1 and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def local_rows(batch: int, ranks: Ranks) -> slice:
    """The rows of the global batch that this rank trains on (an equal share each)."""
    if batch % ranks.world:
        raise UsageError(f"--batch-size {batch} (the global batch) must be a multiple of the {ranks.world} processes")
    share = batch // ranks.world
    return slice(ranks.rank * share, (ranks.rank + 1) * share)


def wrap(objective: nn.Module, ranks: Ranks, device: torch.device, shard: bool, bf16: bool) -> nn.Module:
    """The module the loop calls: the objective itself, DDP over it, or (shard) FSDP2 in place.

    FSDP2 shards each Transformer / autoencoder layer of the trainable part as its own
    group (gathered just for its forward and backward) and the rest with the objective at
    the root. Its bf16 policy (bf16 compute, fp32 gradient reduction and master weights) is
    used on CUDA; on CPU --bf16 stays plain autocast, as gloo reduces bf16 poorly.
    """
    if ranks.world == 1:
        return objective
    if not shard:
        return nn.parallel.DistributedDataParallel(objective, device_ids=[device] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if bf16 and device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for module in objective.trainable().modules():
        if isinstance(module, SHARDED_LAYERS):
            fully_shard(module, mp_policy=policy)
    fully_shard(objective, mp_policy=policy)
    return objective


def sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gradients_held(wrapped: nn.Module, hold: bool) -> Iterator[None]:
    """Skip the gradient all-reduce for a micro-batch that is not the step's last (hold=True)."""
    if not hold:
        yield
    elif sharded(wrapped):
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        with wrapped.no_sync():
            yield


@contextlib.contextmanager
def gathered(objective: nn.Module) -> Iterator[None]:
    """The root's sharded weights gathered, for calls that bypass forward (evaluate); every rank must enter."""
    if not sharded(objective):
        yield
        return
    objective.unshard()
    try:
        yield
    finally:
        objective.reshard()


def full_norm(norm: torch.Tensor) -> float:
    """A gradient norm as a number (FSDP2 returns it as a replicated DTensor)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(objective: nn.Module) -> dict[str, torch.Tensor] | None:
    """The model's full weights on rank 0 (a collective when sharded); None when the module's own state_dict will do."""
    if not sharded(objective):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(objective, options=_full_options())
    return {key.removeprefix("model."): value for key, value in state.items()}


def _names(objective: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names in the order of optimizer.state_dict()'s indices."""
    name_of = {id(p): n for n, p in objective.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state(objective: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state keyed by parameter name (complete on rank 0; a collective when sharded)."""
    if sharded(objective):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(objective, optimizer, options=_full_options())
    return _renamed(optimizer.state_dict(), _names(objective, optimizer).__getitem__)


def _renamed(state: dict[str, Any], rename: Callable[[Any], Any]) -> dict[str, Any]:
    return {
        "state": {rename(key): value for key, value in state["state"].items()},
        "param_groups": [{**group, "params": [rename(key) for key in group["params"]]} for group in state["param_groups"]],
    }


def load_optimizer_state(objective: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore a saved optimizer state on any world size, sharded or not (checkpoints from before names keyed it by index)."""
    if all(isinstance(key, int) for key in state["state"]):
        state = _renamed(state, _names(objective, optimizer).__getitem__)
    if sharded(objective):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(objective, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(_renamed(state, {name: i for i, name in enumerate(_names(objective, optimizer))}.__getitem__))


def mean_over_ranks(values: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    if ranks.world > 1:
        dist.all_reduce(values)
        values = values / ranks.world
    return values


def any_rank(flags: torch.Tensor, ranks: Ranks) -> bool:
    if ranks.world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags.any())
