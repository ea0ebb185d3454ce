"""One run over two "nodes", started as slurm/multinode.sbatch starts it, and the per-rank resources.

The 2-node test runs the batch script itself with bash, with stand-ins for the two Slurm commands it
calls: `scontrol show hostnames` names two nodes (`localhost` and `127.0.0.1`, both this machine) and
`srun` starts the per-node command once per node, with that node's SLURMD_NODENAME/SLURM_NODEID. So
the two torchrun invocations are exactly the script's: `--nnodes=2`, c10d rendezvous on the first
node at a port derived from the job id, the first node hosting the store (`is_host`).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO

SBATCH = REPO / "slurm" / "multinode.sbatch"
NODES = ("localhost", "127.0.0.1")  # two names of this machine: the first hosts the rendezvous

FAKE_SRUN = """#!/bin/bash
# srun stand-in: the command once per node of FAKE_NODES (--nodes=N of them), output to FAKE_LOGS/<node>.log
nodes=1
while [[ ${1:-} == -* ]]; do case $1 in --nodes=*) nodes=${1#--nodes=} ;; esac; shift; done
read -r -a names <<<"$FAKE_NODES"
pids=()
for ((i = 0; i < nodes; i++)); do
    SLURMD_NODENAME=${names[$i]} SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" \\
        >"$FAKE_LOGS/${names[$i]}.log" 2>&1 &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = """#!/bin/bash
# scontrol stand-in: `show hostnames` lists FAKE_NODES; anything else (requeue) succeeds
[[ $1 == show && $2 == hostnames ]] && printf '%s\\n' $FAKE_NODES
exit 0
"""


def _job_id_with_free_port() -> int:
    """A job id whose rendezvous port (the script's 20000 + id % 40000) is free right now."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if 20000 <= port < 60000:
            return port - 20000
    raise AssertionError("no free port in 20000-59999")


def test_one_run_on_two_nodes_with_the_sbatch_rendezvous(mnist_dir, tmp_path):
    bin_dir, logs, out = tmp_path / "bin", tmp_path / "logs", tmp_path / "run"
    bin_dir.mkdir()
    logs.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_NODES": " ".join(NODES),
           "FAKE_LOGS": str(logs), "SLURM_JOB_ID": str(_job_id_with_free_port()), "SLURM_JOB_NODELIST": ",".join(NODES),
           "SLURM_NNODES": "2", "SLURM_CPUS_PER_TASK": "1", "NPROC_PER_NODE": "1", "PYTHON": sys.executable,
           "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "CSKD_RENDEZVOUS_TIMEOUT_S": "60"}
    for leaked in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(leaked, None)
    start = time.monotonic()
    res = subprocess.run(["bash", str(SBATCH), "--config", str(REPO / "configs" / "mnist5k_small_cnn.yaml"),
                          f"data.path={mnist_dir}", f"out_dir={out}", "epochs=1", "threads=1"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    node_logs = {node: (logs / f"{node}.log").read_text() for node in NODES if (logs / f"{node}.log").exists()}
    shown = res.stdout + res.stderr + "".join(f"\n--- {n}:\n{t[-3000:]}" for n, t in node_logs.items())
    assert res.returncode == 0, shown
    assert "2 node(s) x 1 process(es), rendezvous localhost:" in res.stdout, shown

    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["final"]["samples"] == 1000, summary
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [0]
    # rank 0 (on whichever node the rendezvous gave it) logs the layout and the run; the other logs nothing
    main_logs = [text for text in node_logs.values() if "done: final test err" in text]
    assert len(main_logs) == 1, shown
    assert "2 processes on 2 nodes: " in main_logs[0] and all(f"{n} (rank " in main_logs[0] for n in NODES), shown
    print(f"2-node run: {time.monotonic() - start:.1f} s")


# --- the resources of one rank ----------------------------------------------------------------------

LAUNCH_VARS = ("SLURM_JOB_ID", "SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE", "SLURM_TASKS_PER_NODE",
               "SLURM_STEP_TASKS_PER_NODE", "SLURM_NODEID", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID",
               "CSKD_CONCURRENT_RUNS", "CUDA_VISIBLE_DEVICES")


@pytest.fixture
def launch_env(monkeypatch):
    """A clean slate of launcher variables and a 16-core affinity; returns monkeypatch.setenv."""
    from cskd import distributed

    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(16)))
    return monkeypatch.setenv


@pytest.mark.parametrize("env, cores", [
    ({}, 16),                                                              # a plain process: its affinity
    ({"LOCAL_WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "x"}, 4),            # torchrun, 4 ranks on this machine
    ({"SLURM_CPUS_PER_TASK": "8"}, 16),                                    # outside a Slurm job: ignored
    ({"SLURM_JOB_ID": "1", "SLURM_CPUS_PER_TASK": "8"}, 8),               # one rank per Slurm task
    ({"SLURM_JOB_ID": "1", "SLURM_CPUS_PER_TASK": "8", "LOCAL_WORLD_SIZE": "2"}, 8),  # submitit exports it too
    ({"SLURM_JOB_ID": "1", "SLURM_CPUS_PER_TASK": "12", "LOCAL_WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "x"}, 3),
    ({"SLURM_JOB_ID": "1", "SLURM_CPUS_PER_TASK": "64"}, 16),              # never more than the affinity
    ({"SLURM_JOB_ID": "1", "SLURM_CPUS_ON_NODE": "12", "SLURM_TASKS_PER_NODE": "3(x2),1"}, 4),
    ({"SLURM_JOB_ID": "1", "SLURM_CPUS_ON_NODE": "12", "SLURM_TASKS_PER_NODE": "3(x2),1", "SLURM_NODEID": "2"}, 12),
    ({"SLURM_JOB_ID": "1", "SLURM_CPUS_ON_NODE": "12", "SLURM_STEP_TASKS_PER_NODE": "2",
      "SLURM_TASKS_PER_NODE": "4"}, 6),                                    # the step's count, not the job's
    ({"SLURM_JOB_ID": "1", "SLURM_CPUS_PER_TASK": "8", "CSKD_CONCURRENT_RUNS": "4"}, 2),  # a packed task
    ({"CSKD_CONCURRENT_RUNS": "32"}, 1),                                   # at least one
])
def test_cpus_per_rank(launch_env, env, cores):
    from cskd.distributed import cpus_per_rank

    for name, value in env.items():
        launch_env(name, value)
    assert cpus_per_rank() == cores


@pytest.mark.parametrize("name, value, fragment", [
    ("SLURM_CPUS_PER_TASK", "eight", "SLURM_CPUS_PER_TASK='eight' must be a whole number >= 1"),
    ("SLURM_TASKS_PER_NODE", "2(y3)", "SLURM_TASKS_PER_NODE='2(y3)' is not Slurm's tasks-per-node list"),
    ("CSKD_CONCURRENT_RUNS", "0", "CSKD_CONCURRENT_RUNS='0' must be a whole number >= 1"),
])
def test_cpus_per_rank_names_a_bad_variable(launch_env, name, value, fragment):
    from cskd.distributed import cpus_per_rank
    from cskd.errors import ConfigError

    launch_env("SLURM_JOB_ID", "1")
    launch_env("SLURM_CPUS_ON_NODE", "4")
    launch_env(name, value)
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        cpus_per_rank()


def test_visible_gpus_follow_cuda_visible_devices(launch_env, monkeypatch):
    from cskd import distributed

    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 2)
    assert distributed.visible_gpus() == ["0", "1"]
    launch_env("CUDA_VISIBLE_DEVICES", "3, 5")
    assert distributed.visible_gpus() == ["3", "5"]
    launch_env("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 0)
    assert distributed.visible_gpus() == []


def test_rank_ranges():
    from cskd.distributed import _ranges

    assert _ranges([0]) == "0" and _ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_the_sbatch_script_and_the_test_meet_the_same_way():
    """The script leaves node ranks to the c10d rendezvous (torchrun ignores --node-rank with it) and
    says explicitly which node hosts the store."""
    text = SBATCH.read_text()
    for arg in ('--nnodes="$SLURM_NNODES"', "--rdzv_backend=c10d", '--rdzv_endpoint="$HEAD:$PORT"',
                '--rdzv_id="$SLURM_JOB_ID"', '--rdzv_conf="is_host=$is_host"'):
        assert arg in text, arg
    assert "node_rank" not in text and "node-rank" not in text
