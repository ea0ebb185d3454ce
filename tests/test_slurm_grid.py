"""launch/grid.py against a real Slurm (the local one of slurm/start_local.sh, started by .ci/run).

Skipped, with the reason, where no Slurm controller answers. Every wait has a deadline.
"""
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli, slurm_missing, wait_for

GRID = str(REPO / "launch" / "grid.py")
COLLECT = str(REPO / "launch" / "collect.py")


MISSING = slurm_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))


def write_grid(path: Path, data_dir: Path, **extra) -> Path:
    grid = {"name": path.stem, "base": str(REPO / "configs" / "mnist5k_small_cnn.yaml"),
            "overrides": {"data.path": str(data_dir), "epochs": 1},
            "resources": {"partition": "cpu", "gpus_per_node": 0, "cpus_per_task": 1, "time": 60}}
    for key, value in extra.items():
        grid[key] = {**grid[key], **value} if isinstance(grid.get(key), dict) else value
    path.write_text(yaml.safe_dump(grid))
    return path


def squeue_ids() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True, timeout=30).stdout
    return set(out.split())


def job_record(run_dir: Path) -> dict:
    return json.loads((run_dir / "job.json").read_text())


def test_grid_is_one_job_array_and_relaunch_submits_nothing(mnist_dir, tmp_path):
    grid = write_grid(tmp_path / "arr.yaml", mnist_dir, axes={"method": ["ce", "cskd"]}, seeds=[0, 1])
    out = tmp_path / "out"
    res = run_cli([GRID, "--grid", str(grid), "--out", str(out), "--wait"], timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    runs = [out / "mnist5k" / "small_cnn" / m / f"seed{s}" for m in ("ce", "cskd") for s in (0, 1)]
    ids = [job_record(r)["job_id"] for r in runs]
    assert len({i.split("_")[0] for i in ids}) == 1 and sorted(i.split("_")[1] for i in ids) == ["0", "1", "2", "3"]
    assert all((r / "summary.json").exists() for r in runs)
    table = run_cli([COLLECT, str(out)], timeout=120).stdout
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| c")}
    assert set(rows) == {"ce", "cskd"} and all("n=2" in row for row in rows.values()), table
    assert "All 4 runs are done" in table

    again = run_cli([GRID, "--grid", str(grid), "--out", str(out)], timeout=300)
    assert again.returncode == 0 and again.stdout.count("skip") == 4 and "nothing to submit" in again.stdout
    assert [job_record(r)["job_id"] for r in runs] == ids  # nothing resubmitted


def test_preempted_run_requeues_resumes_and_matches_an_uninterrupted_run(mnist_dir, tmp_path):
    overrides = {"epochs": 4, "deterministic": True, "threads": 1}
    grid = write_grid(tmp_path / "pre.yaml", mnist_dir, overrides=overrides, axes={"method": ["cskd"]}, seeds=[0])
    out = tmp_path / "out"
    run_dir = out / "mnist5k" / "small_cnn" / "cskd" / "seed0"
    res = run_cli([GRID, "--grid", str(grid), "--out", str(out)], timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    job_id = job_record(run_dir)["job_id"]
    wait_for(lambda: (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 1,
             240, "the first epoch of the run")
    # A higher-priority job that needs both cores: Slurm preempts ours (USR2 -> checkpoint -> requeue).
    urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "-c", "2", "-o", "/dev/null", "--wrap", "sleep 2"],
                            capture_output=True, text=True, timeout=60)
    assert urgent.returncode == 0, urgent.stderr

    relaunch = run_cli([GRID, "--grid", str(grid), "--out", str(out), "--wait"], timeout=600)
    assert relaunch.returncode == 0, relaunch.stdout[-3000:] + relaunch.stderr[-3000:]
    assert "skip" in relaunch.stdout and job_record(run_dir)["job_id"] == job_id  # waited, did not resubmit
    err = job_record(run_dir)["log"]
    log = Path(err).read_text() + Path(err.replace(".err", ".out")).read_text()
    assert "preempted" in log and "resuming" in log, log[-3000:]
    def job_history() -> list[str]:  # -D: every requeue
        return subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-o", "State", "-j", job_id],
                              capture_output=True, text=True, timeout=60).stdout.split()

    # --wait returns once the run's summary exists; the job itself (submitit's result pickle, the process exit,
    # slurmctld's accounting) finishes a moment later, so sacct may still say RUNNING.
    history = wait_for(lambda: (h := job_history()) and h[-1] not in ("RUNNING", "COMPLETING") and h,
                       120, "Slurm to record the job's end")
    assert history[-1] == "COMPLETED" and {"REQUEUED", "PREEMPTED"} & set(history[:-1]), history

    reference = tmp_path / "uninterrupted"
    ref = run_cli(["-m", "cskd.train", "--config", str(run_dir / "config.yaml"), f"out_dir={reference}"], timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    got, want = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference))
    assert got["final"] == want["final"] and got["best"] == want["best"]


def test_cancelled_run_is_reported_and_relaunch_resubmits_only_it(mnist_dir, tmp_path):
    grid = write_grid(tmp_path / "can.yaml", mnist_dir, axes={"method": ["ce"]}, seeds=[0, 1],
                      resources={"array_parallelism": 1})
    out = tmp_path / "out"
    first, second = (out / "mnist5k" / "small_cnn" / "ce" / f"seed{s}" for s in (0, 1))
    res = run_cli([GRID, "--grid", str(grid), "--out", str(out)], timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    cancelled_id = job_record(second)["job_id"]
    subprocess.run(["scancel", cancelled_id], check=True, timeout=60)  # still pending: parallelism 1
    wait_for(lambda: (first / "summary.json").exists() and not squeue_ids() & {job_record(first)["job_id"]},
             300, "the first run")
    status = run_cli([COLLECT, str(out), "--status"], timeout=120).stdout
    assert "done 1" in status and "cancelled 1" in status and "missing 0" in status, status
    assert f"ce/seed1`: job {cancelled_id}, CANCELLED" in status, status

    again = run_cli([GRID, "--grid", str(grid), "--out", str(out), "--wait"], timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    plan = [l for l in again.stdout.splitlines() if l.startswith(("skip", "todo"))]
    assert len(plan) == 2 and plan[0].startswith("skip") and plan[1].startswith("todo") and "was cancelled" in plan[1]
    assert job_record(second)["job_id"] != cancelled_id and (second / "summary.json").exists()


def test_two_task_ddp_run_under_slurm(mnist_dir, tmp_path):
    grid = write_grid(tmp_path / "ddp.yaml", mnist_dir, axes={"method": ["cskd"]}, seeds=[0],
                      resources={"tasks_per_node": 2})
    res = run_cli([GRID, "--grid", str(grid), "--out", str(tmp_path / "out"), "--wait"], timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "mnist5k" / "small_cnn" / "cskd" / "seed0" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["final"]["samples"] == 1000


@pytest.mark.parametrize("flags, message", [
    (["--partition", "nosuchpartition"], "invalid partition specified: nosuchpartition"),
    (["--partition", "cpu", "--cpus-per-task", "64"], "Requested node configuration is not available"),
    (["--partition", "cpu", "--nodes", "4"], "Requested node configuration is not available"),
    (["--partition", "cpu", "--sbatch", "constraint=nosuchfeature"], "Invalid feature specification"),
    (["--partition", "cpu", "--sbatch", "nosuchflag=1"], "unrecognized option '--nosuchflag=1'"),
])
def test_refused_request_fails_before_submitting(mnist_dir, tmp_path, flags, message, capsys):
    from launch.grid import main

    grid = write_grid(tmp_path / "bad.yaml", mnist_dir, axes={"method": ["ce"]}, seeds=[0])
    before = squeue_ids()
    args = [GRID, "--grid", str(grid), "--out", str(tmp_path / "out"), *flags]
    if flags[1] == "nosuchpartition":  # as users see it; the other requests call grid.py's main in this process
        res = run_cli(args, timeout=300)
    else:
        res = subprocess.CompletedProcess(args, main(args[1:]), *capsys.readouterr())
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "Slurm refuses the resource request" in res.stderr and message in res.stderr, res.stderr
    assert squeue_ids() <= before and not (tmp_path / "out").exists()  # no orphan jobs, nothing written


def test_unreachable_controller_names_what_to_check(mnist_dir, tmp_path):
    conf = Path("/etc/slurm/slurm.conf").read_text()
    bad = tmp_path / "slurm.conf"  # the same cluster, but a port where no slurmctld listens
    bad.write_text("\n".join("SlurmctldPort=6999" if l.startswith("SlurmctldPort") else l for l in conf.splitlines()))
    grid = write_grid(tmp_path / "g.yaml", mnist_dir, axes={"method": ["ce"]}, seeds=[0])
    res = run_cli([GRID, "--grid", str(grid), "--out", str(tmp_path / "out")], timeout=120,
                  env={"SLURM_CONF": str(bad)})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "the Slurm controller is not reachable" in res.stderr and "SLURM_CONF" in res.stderr
    assert not (tmp_path / "out").exists()


def test_failing_run_is_reported_with_its_log_and_others_finish(mnist_dir, tmp_path):
    grid = write_grid(tmp_path / "fail.yaml", mnist_dir, axes={"method": ["ce", "cskd"]}, seeds=[0],
                      rules=[{"if": {"method": "cskd"}, "set": {"lr": 1e30}}])  # CS-KD's loss overflows
    out = tmp_path / "out"
    res = run_cli([GRID, "--grid", str(grid), "--out", str(out), "--wait"], timeout=600)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert (out / "mnist5k" / "small_cnn" / "ce" / "seed0" / "summary.json").exists()
    failed = [l for l in res.stderr.splitlines() if l.startswith("failed:")]
    assert len(failed) == 1 and "cskd/seed0" in failed[0] and "NonFiniteLossError" in failed[0], res.stderr
    log = failed[0].rsplit("(log: ", 1)[1].rstrip(")")
    assert "NonFiniteLossError" in Path(log).read_text()


def test_packed_runs_share_one_array_task(mnist_dir, tmp_path):
    """--runs-per-gpu 2 on a CPU partition: CE and a CS-KD run whose loss overflows share one array task,
    each its own process with half of the task's cores and a log of its own. CE finishes; CS-KD is
    reported failed with the error from its own log."""
    grid = write_grid(tmp_path / "pack.yaml", mnist_dir, axes={"method": ["ce", "cskd"]}, seeds=[0],
                      rules=[{"if": {"method": "cskd"}, "set": {"lr": 1e30}}], resources={"cpus_per_task": 2})
    out = tmp_path / "out"
    res = run_cli([GRID, "--grid", str(grid), "--out", str(out), "--runs-per-gpu", "2", "--wait"], timeout=600)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    ce, cskd = (out / "mnist5k" / "small_cnn" / m / "seed0" for m in ("ce", "cskd"))
    records = [job_record(r) for r in (ce, cskd)]
    assert records[0]["job_id"] == records[1]["job_id"] and records[0]["log"] != records[1]["log"]
    assert json.loads((ce / "summary.json").read_text())["world_size"] == 1
    assert "done: final test err" in Path(records[0]["log"]).read_text()
    assert all(yaml.safe_load((r / "config.yaml").read_text())["threads"] == 1 for r in (ce, cskd))  # 2 cores, 2 runs
    failed = [l for l in res.stderr.splitlines() if l.startswith("failed:")]
    assert len(failed) == 1 and f"{cskd}: FAILED: NonFiniteLossError: " in failed[0], res.stderr
    assert failed[0].endswith(f"(log: {records[1]['log']})")
