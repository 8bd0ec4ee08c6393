"""One code path from a CPU to many GPUs: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK, we use PyTorch DDP."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "all_reduce_sum", "any_rank", "cleanup", "resolve_device", "setup"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # True when setup() joined the process group: the caller leaves it with cleanup() when done.
    joined: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0, key: str = "train.device") -> torch.device:
    """``auto``, ``cpu``, ``cuda`` (this process's local rank's GPU) or ``cuda:N`` as a device this machine has; an
    error naming ``key`` otherwise."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{key}={name!r}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{key}={name!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{key}={name!r} but no CUDA device is available")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"{key}={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def setup(device: str = "auto", timeout_s: float = 300.0) -> DistInfo:
    """Join the process group when launched by torchrun (NCCL on GPU, gloo on CPU); a single process otherwise.
    A collective that waits ``timeout_s`` for a stalled or dead rank ends the job with an error."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    joined = world_size > 1 and not dist.is_initialized()
    if joined:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        from datetime import timedelta

        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, world_size, local_rank, dev, joined)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (so all stop together, none hangs)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _gloo_destructor_holds_the_gil() -> bool:
    """PyTorch before 2.8 destroys a gloo process group holding the GIL while it joins the group's threads, also in
    destroy_process_group; a thread that is still freeing a finished collective's tensors waits for the GIL: a hang
    at exit (pytorch/pytorch#154976 released the GIL there)."""
    return torch.__version__ < (2, 8) and dist.get_backend() == "gloo"


def cleanup() -> None:
    """Leave the process group. A process that exits without it can abort while the backend's threads still run
    ("terminate called without an active exception", seen about once in eight 2-process gloo runs)."""
    if dist.is_available() and dist.is_initialized():
        if _gloo_destructor_holds_the_gil():
            # The group's threads get the GIL to free what the last collectives held before the group is
            # destroyed. Under load on 2 cores, PyTorch 2.6 hung at exit in 3 of 3 two-process runs without it.
            import time

            time.sleep(0.5)
        dist.destroy_process_group()
