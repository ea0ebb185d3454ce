"""The one place that reads the torchrun / Slurm environment and talks to torch.distributed.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Under Slurm without
torchrun, submitit's `TorchDistributedEnvironment().export()` sets the same variables; a bare
`srun` sets only SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, which are used when MASTER_ADDR is given.
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cskd.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str) -> int | None:
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return None


def read_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables, else Slurm's, else a single process."""
    world = _env_int("WORLD_SIZE")
    if world is not None:
        return _env_int("RANK") or 0, world, _env_int("LOCAL_RANK") or 0
    if os.environ.get("MASTER_ADDR") and _env_int("SLURM_NTASKS") not in (None, 1):
        return _env_int("SLURM_PROCID") or 0, _env_int("SLURM_NTASKS"), _env_int("SLURM_LOCALID") or 0
    return 0, 1, 0


def resolve_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    if preference in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto") -> DistEnv:
    """Join the process group (nccl on CUDA, gloo on CPU) if launched with more than one process."""
    rank, world_size, local_rank = read_env()
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, init_method="env://", **kwargs)
    return DistEnv(rank, world_size, local_rank, device)


def configure_torch(threads: int = 0, deterministic: bool = False) -> None:
    """This process's torch settings for a run: intra-op threads (0: torch's default) and determinism."""
    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic GEMMs
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not deterministic


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def session(device_preference: str = "auto"):
    """This process's DistEnv for the length of a command: joins the process group, and on leaving
    waits for every rank before tearing it down (a rank tearing down its process group while rank 0
    still writes can abort rank 0); on an error it tears down at once."""
    env = init_distributed(device_preference)
    try:
        yield env
        barrier()
    finally:
        shutdown()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's rows in rank order; ranks may hold different row counts (no padding kept)."""
    if not dist.is_initialized():
        return t
    counts = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(counts) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, counts)
    sizes = [int(s.item()) for s in sizes]
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def check_identical(value, what: str) -> None:
    """Fail loudly if ranks disagree on `value` (a seed, a dataset size): they would silently diverge."""
    values = all_gather_objects(value)
    if any(v != values[0] for v in values):
        raise ConfigError(f"{what} differs across ranks: {values}; launch every rank with the same config")


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank `src`'s buffers (BatchNorm running statistics).

    DDP syncs buffers from rank 0 only at the start of the next forward, so after a step that
    updates them outside that sync (CS-KD's second, partner forward) each rank holds its own. An
    evaluation with those would score no single model; with rank 0's it scores the checkpoint."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src)


def device_name(env: DistEnv) -> str:
    """The hardware of a run, for summaries and tables: GPU model (or CPU threads and host) x processes."""
    if env.device.type == "cuda":
        return f"{torch.cuda.get_device_name(env.device)} x{env.world_size}"
    return f"cpu ({torch.get_num_threads()} threads/process) x{env.world_size} on {socket.gethostname()}"


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
