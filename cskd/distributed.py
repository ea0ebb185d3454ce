"""The one place that reads the torchrun / Slurm environment and talks to torch.distributed.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Under Slurm without
torchrun, submitit's `TorchDistributedEnvironment().export()` sets the same variables; a bare
`srun` sets only SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, which are used when MASTER_ADDR is given.

Every variable is checked before anything runs (a one-line ConfigError naming it), and joining the
other ranks waits at most CSKD_RENDEZVOUS_TIMEOUT_S seconds (default 300): variables left over in a
shell (WORLD_SIZE=2 in a single process) fail with a message instead of waiting for ranks that never
come. That bound covers the rendezvous only; collectives keep torch's own timeout.
"""
from __future__ import annotations

import gc
import math
import os
import re
import socket
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_nccl_timeout, default_pg_timeout

from cskd.errors import ConfigError

RENDEZVOUS_TIMEOUT_VAR = "CSKD_RENDEZVOUS_TIMEOUT_S"
# Runs a launcher started side by side on one CPU pool (a Slurm task, a machine): they split its cores.
CONCURRENT_RUNS_VAR = "CSKD_CONCURRENT_RUNS"
DEFAULT_RENDEZVOUS_TIMEOUT_S = 300.0
_SINGLE = "or unset WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT to run a single process"


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


@dataclass(frozen=True)
class LaunchEnv:
    """How this process was launched, from the environment; `names`: the variables that gave the
    rank and the world size, for messages."""
    rank: int
    world_size: int
    local_rank: int
    names: tuple[str, str] = ("RANK", "WORLD_SIZE")


def _env_int(name: str, minimum: int = 0) -> int | None:
    """An integer environment variable (None if unset or empty), or a ConfigError naming it."""
    raw = os.environ.get(name, "")
    if not raw.strip():
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer; launchers (torchrun, Slurm) "
                          f"set it: launch with torchrun, {_SINGLE}") from None
    if value < minimum:
        raise ConfigError(f"environment variable {name}={value} must be >= {minimum}; launch with torchrun, "
                          f"{_SINGLE}")
    return value


def launch_env() -> LaunchEnv:
    """This process's rank, world size and local rank from torchrun's variables, else Slurm's, else a
    single process; checked for consistency, and for the rendezvous address when there are several."""
    world = _env_int("WORLD_SIZE", minimum=1)
    if world is not None:
        env = LaunchEnv(_env_int("RANK") or 0, world, _env_int("LOCAL_RANK") or 0)
    elif os.environ.get("MASTER_ADDR") and _env_int("SLURM_NTASKS", minimum=1) not in (None, 1):
        env = LaunchEnv(_env_int("SLURM_PROCID") or 0, _env_int("SLURM_NTASKS"), _env_int("SLURM_LOCALID") or 0,
                        ("SLURM_PROCID", "SLURM_NTASKS"))
    else:
        return LaunchEnv(0, 1, 0)
    rank_name, world_name = env.names
    if env.rank >= env.world_size:
        raise ConfigError(f"{rank_name}={env.rank} is not below {world_name}={env.world_size}; launch with "
                          f"torchrun, {_SINGLE}")
    if env.world_size > 1:
        _check_master(env)
    return env


def _check_master(env: LaunchEnv) -> None:
    """Several processes meet at MASTER_ADDR:MASTER_PORT: both must be given, the port a TCP port."""
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name, "").strip()]
    if missing:
        raise ConfigError(f"{env.names[1]}={env.world_size} is set but {' and '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not: launch with torchrun (it sets them all), "
                          f"{_SINGLE}")
    port = _env_int("MASTER_PORT", minimum=1)
    if port > 65535:
        raise ConfigError(f"environment variable MASTER_PORT={port} is not a TCP port (1-65535); launch with "
                          f"torchrun, {_SINGLE}")


def read_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables, else Slurm's, else a single process."""
    env = launch_env()
    return env.rank, env.world_size, env.local_rank


def rendezvous_timeout_s() -> float:
    """How long joining the other ranks may take: CSKD_RENDEZVOUS_TIMEOUT_S, default 300 s."""
    raw = os.environ.get(RENDEZVOUS_TIMEOUT_VAR, "").strip()
    if not raw:
        return DEFAULT_RENDEZVOUS_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"environment variable {RENDEZVOUS_TIMEOUT_VAR}={raw!r} must be a positive number of "
                          f"seconds (default {DEFAULT_RENDEZVOUS_TIMEOUT_S:g})")
    return value


def resolve_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    if preference in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto") -> DistEnv:
    """Join the process group (nccl on CUDA, gloo on CPU) if launched with more than one process."""
    launch = launch_env()
    device = resolve_device(device_preference, launch.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launch.world_size > 1 and not dist.is_initialized():
        os.environ.setdefault("RANK", str(launch.rank))
        os.environ.setdefault("WORLD_SIZE", str(launch.world_size))
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        store = _rendezvous(launch, backend)
        dist.init_process_group(backend=backend, store=store, rank=launch.rank, world_size=launch.world_size,
                                **kwargs)
        _log_layout(launch.rank)
    return DistEnv(launch.rank, launch.world_size, launch.local_rank, device)


def node_name() -> str:
    """This machine as the scheduler names it (Slurm's node name), else its host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _log_layout(rank: int) -> None:
    """Rank 0 prints which node holds which ranks: a multi-node run's log then shows that every node
    joined, and where to look when one is slow."""
    names = all_gather_objects(node_name())
    if rank != 0:
        return
    ranks: dict[str, list[int]] = {}
    for r, name in enumerate(names):
        ranks.setdefault(name, []).append(r)
    nodes = ", ".join(f"{name} (rank{'s' if len(rs) > 1 else ''} {_ranges(rs)})" for name, rs in ranks.items())
    print(f"{len(names)} processes on {len(ranks)} node{'s' if len(ranks) > 1 else ''}: {nodes}", flush=True)


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts: list[list[int]] = []
    for n in numbers:
        if parts and n == parts[-1][-1] + 1:
            parts[-1].append(n)
        else:
            parts.append([n])
    return ",".join(f"{p[0]}-{p[-1]}" if len(p) > 1 else str(p[0]) for p in parts)


def _rendezvous(launch: LaunchEnv, backend: str) -> dist.Store:
    """The store at MASTER_ADDR:MASTER_PORT that env:// init would create (torchrun's agent store
    included), once every rank has connected, within CSKD_RENDEZVOUS_TIMEOUT_S.

    env:// init alone waits the process group's timeout (30 min) for ranks that may never come. The
    store then gets that timeout back, as init_process_group gives it: only the meeting is bounded."""
    timeout = rendezvous_timeout_s()
    try:
        with _stderr_kept_unless_failed():
            store, _, _ = next(dist.rendezvous("env://", rank=launch.rank, world_size=launch.world_size,
                                               timeout=timedelta(seconds=timeout)))
    except (RuntimeError, ValueError, OSError) as e:  # torch's DistStoreError/DistNetworkError are RuntimeErrors
        raise ConfigError(_rendezvous_failure(launch, timeout, e)) from None
    store.set_timeout(default_pg_nccl_timeout if backend == "nccl" and default_pg_nccl_timeout else default_pg_timeout)
    # As init_process_group does with a store it makes itself: torchrun's agent store is shared with
    # the agent, so the process group's keys get a prefix of their own.
    return dist.PrefixStore("default_pg", store)


@contextmanager
def _stderr_kept_unless_failed():
    """Hold what is written to file descriptor 2 meanwhile: passed on if the block succeeds, dropped if
    it fails. torch's C++ store logs each failed connection attempt with a C++ stack trace, straight
    to fd 2; on failure the one-line error says what happened instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            raise
        else:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.buffer.write(held.read())
            sys.stderr.flush()
        finally:
            os.close(saved)


def _rendezvous_failure(launch: LaunchEnv, timeout: float, error: Exception) -> str:
    rank_name, world_name = launch.names
    where = f"MASTER_ADDR={os.environ.get('MASTER_ADDR')} MASTER_PORT={os.environ.get('MASTER_PORT')}"
    awaited = (f"the other {launch.world_size - 1} process(es) of {world_name}={launch.world_size} to connect"
               if launch.rank == 0 else f"rank 0 of {world_name}={launch.world_size} to serve it")
    said = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    return (f"could not join the other ranks at {where}: as {rank_name}={launch.rank} this process gave up waiting "
            f"for {awaited} ({RENDEZVOUS_TIMEOUT_VAR}={timeout:g} s; torch: {said}); start every rank together "
            f"(torchrun --nproc_per_node=N), {_SINGLE}")


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
        # Free what still holds the process group (a DDP reducer, FSDP or ZeRO state caught in a
        # reference cycle) while it is alive: destroyed after it, at interpreter exit, a gloo rank
        # could abort ("terminate called without an active exception").
        gc.collect()
        barrier()
    finally:
        shutdown()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over ranks (in place where distributed); `t` itself on one process."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
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


def all_gather_equal(t: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's `t` in rank order, every rank giving the same shape: unlike
    `all_gather_rows` it reads nothing back to the host, so it can run every step."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


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


def visible_gpus() -> list[str]:
    """The GPUs CUDA shows this process, named as CUDA_VISIBLE_DEVICES names them: a child process
    given one of these names as its CUDA_VISIBLE_DEVICES sees that GPU (as cuda:0). [] without GPUs."""
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    return [g.strip() for g in listed.split(",") if g.strip()][:count]


def local_world_size() -> int:
    """The processes of this run on this node (torchrun's LOCAL_WORLD_SIZE; 1 when unset)."""
    return _env_count("LOCAL_WORLD_SIZE") or 1


def cpus_per_rank() -> int:
    """The CPU cores this process may use (at least 1): the default for loader workers and threads.

    The pool is what the scheduler granted: Slurm's SLURM_CPUS_PER_TASK (this task's cores), else
    SLURM_CPUS_ON_NODE (the job's cores on this node), else this process's CPU affinity. The processes
    started on the pool split it: torchrun's LOCAL_WORLD_SIZE ranks (a Slurm task running torchrun),
    Slurm's tasks on this node, and the CSKD_CONCURRENT_RUNS runs a launcher packed side by side. The
    share never exceeds the affinity: Slurm may bind a task to fewer cores than it names.
    """
    affinity = len(os.sched_getaffinity(0))
    # torchrun's workers of one Slurm task share that task's cores; a rank that is a Slurm task itself
    # (submitit, srun) has them alone, although submitit exports LOCAL_WORLD_SIZE too.
    torchrun_ranks = (_env_count("LOCAL_WORLD_SIZE") or 1) if os.environ.get("TORCHELASTIC_RUN_ID") else 1
    in_slurm = bool(os.environ.get("SLURM_JOB_ID"))  # SLURM_* left over in a shell outside a job mean nothing
    per_task = _env_count("SLURM_CPUS_PER_TASK") if in_slurm else None
    on_node = _env_count("SLURM_CPUS_ON_NODE") if in_slurm else None
    if per_task is not None:
        pool, sharers = per_task, torchrun_ranks
    elif on_node is not None:
        pool, sharers = on_node, _slurm_tasks_on_node() * torchrun_ranks
    else:
        pool, sharers = affinity, _env_count("LOCAL_WORLD_SIZE") or 1
    sharers *= _env_count(CONCURRENT_RUNS_VAR) or 1
    return max(1, min(pool // sharers, affinity))


def _env_count(name: str) -> int | None:
    """A count of cores, tasks or processes from the environment (None if unset), or a ConfigError."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"environment variable {name}={raw!r} must be a whole number >= 1 (Slurm, torchrun "
                          f"or launch/grid.py set it); unset it where it was set by hand")
    return int(raw)


def _slurm_tasks_on_node() -> int:
    """How many tasks of this Slurm job step (else job) run on this node: SLURM_STEP_TASKS_PER_NODE /
    SLURM_TASKS_PER_NODE list them per node, compressed ('2(x3),1'), indexed by SLURM_NODEID."""
    name = next((n for n in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if os.environ.get(n)), None)
    if name is None:
        return 1
    counts = []
    for part in os.environ[name].split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise ConfigError(f"environment variable {name}={os.environ[name]!r} is not Slurm's tasks-per-node "
                              f"list (e.g. '2(x3),1'); unset it outside a Slurm job")
        counts += [int(match[1])] * int(match[2] or 1)
    raw_node = os.environ.get("SLURM_NODEID", "").strip()
    node = int(raw_node) if raw_node.isdigit() else 0
    return max(counts[node] if node < len(counts) else counts[-1], 1)


def slurm_job_id() -> str | None:
    """This process's Slurm job as `squeue` and job.json name it ('123', or '123_4' for an array task)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None
