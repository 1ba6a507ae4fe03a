"""Distributed setup in one place: rank and world from torchrun, the deepspeed launcher or Slurm.

torchrun and the deepspeed launcher set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; under
`srun` (one task per GPU) only SLURM_* exist, so they are mapped here.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_info(environ: dict[str, str] | None = None) -> DistInfo:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistInfo()


def init_distributed(backend: str = "auto", timeout_s: int = 1800, deepspeed: bool = False) -> DistInfo:
    """Initialise torch.distributed when launched with several processes; a no-op for one process.
    With `deepspeed`, through `deepspeed.init_distributed` (so deepspeed.comm is set up too), always: a
    DeepSpeed engine needs a process group even with one rank."""
    info = env_info()
    if dist.is_initialized() or (not info.distributed and not deepspeed):
        return info
    # Slurm without torchrun: export what torch.distributed's env:// rendezvous reads.
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        if deepspeed:
            import deepspeed as ds

            ds.init_distributed(dist_backend=backend, timeout=timeout, auto_mpi_discovery=False)
            _release_deepspeed_shm(info)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    except Exception as e:  # the store raises DistStoreError / RuntimeError / TimeoutError by version
        if "timed out" in str(e).lower() or "timeout" in type(e).__name__.lower():
            raise RendezvousTimeout(
                f"rendezvous timed out after {timeout_s}s: rank {info.rank} of {info.world_size} waited at "
                f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} and not every rank joined. Check that "
                f"every node started its processes and can reach that address (engine.rendezvous_timeout_s). "
                f"[{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}]") from None
        raise
    return info


def _release_deepspeed_shm(info: DistInfo) -> None:
    """Unlink this rank's DeepSpeed shared-memory segment as soon as every rank has mapped it.

    When its launcher says all ranks are on one host (LOCAL_SIZE), DeepSpeed's CPU backend sets up a shared-
    memory all-reduce during init: each rank creates a ~69 MB segment in /dev/shm and maps every peer's, and
    nothing ever unlinks them. Each such run left ranks x 69 MB of RAM behind until reboot (a few dozen runs
    fill a laptop's /dev/shm, and later jobs die of memory). A rank's init returns only after it has mapped
    all peers' segments, so after a barrier the names can go: the mappings stay valid and the kernel frees the
    memory when the processes exit, however they exit."""
    barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{info.rank}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except (FileNotFoundError, NotADirectoryError):
        pass  # no shm all-reduce (ranks on several hosts, a GPU accelerator) or not a Linux /dev/shm


class RendezvousTimeout(RuntimeError):
    """Not every rank reached the process-group rendezvous in time (a node never started, or is unreachable)."""


def device_for(info: DistInfo, requested: str = "auto") -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device: cuda requested but no CUDA device is available")
    return torch.device("cuda", info.local_rank)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _reduce(values: list[float], op) -> list[float]:
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def all_mean(value: float) -> float:
    """Mean of a float over ranks (for logging global-batch losses)."""
    if not dist.is_initialized():
        return value
    return _reduce([value], dist.ReduceOp.SUM)[0] / dist.get_world_size()


def all_true(flag: bool) -> bool:
    """True only if `flag` is true on every rank: decisions that change the call schedule must agree."""
    if not dist.is_initialized():
        return flag
    return _reduce([1.0 if flag else 0.0], dist.ReduceOp.MIN)[0] > 0.5


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value on every rank: anything random that could change the model-call schedule goes here."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
