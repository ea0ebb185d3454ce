"""End to end, real torchrun processes on CPU (gloo): gradient accumulation, the engines (DDP, FSDP2,
ZeRO-1), exact resume after SIGKILL under each, resume on another world size, and torch.compile.

Kept few and small (mnist5k, small_cnn, 2 epochs): the runs are shared by the checks below."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess

import pytest
import torch

from cskd import rundir
from cskd.models import build_model
from conftest import REPO, TORCHRUN, run_cli, train_args

KILL_AT = str(REPO / "tests" / "kill_at.py")
# No augmentation (its random streams are per rank) and deterministic kernels: two runs that differ
# only in how a step is split must compute the same gradients.
EXACT = ("data.pipeline=none", "deterministic=true", "batch.global=64")


def _torchrun(nproc: int, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=nproc <args>` (`-m cskd.train ...` or a script and its arguments)."""
    return subprocess.run([*TORCHRUN, f"--nproc_per_node={nproc}", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _run(nproc: int, mnist_dir, out, *overrides: str, kill: tuple[str, int] | None = None):
    """Train (or resume) `out` on `nproc` processes; `kill`: SIGKILL rank 0 at that kill_at.py point."""
    args = train_args(mnist_dir, out, *overrides)
    if kill is not None:
        args = [KILL_AT, kill[0], str(kill[1]), *args[2:]]
    if nproc == 1:
        return run_cli(args)
    return _torchrun(nproc, args)


def _weights(out) -> dict[str, torch.Tensor]:
    return torch.load(out / rundir.CHECKPOINT, weights_only=True)["model"]


def _assert_close_weights(a, b, atol: float = 1e-5) -> None:
    """The run dirs' checkpointed weights are equal within `atol` (+ 1e-4 relative; 0: exactly)."""
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name].float(), wb[name].float(), atol=atol, rtol=1e-4 if atol else 0,
                                   msg=name)


def _summary(out) -> dict:
    return json.loads((out / rundir.SUMMARY).read_text())


def test_gradient_accumulation_equals_a_bigger_batch(mnist_dir, tmp_path):
    """global 64: 4 micro-batches of 16 on 1 rank == 32 on each of 2 ranks == 64 on 1 rank (GroupNorm:
    no batch statistics, so only float rounding may differ). A small lr keeps 63 steps of SGD from
    amplifying that rounding; the weights still move far more than the tolerance."""
    common = (*EXACT, "model=small_cnn_gn", "epochs=1", "lr=0.001")
    runs = {"accum": (1, "batch.micro_per_rank=16"), "ranks": (2, "batch.micro_per_rank=32"),
            "whole": (1, "batch.micro_per_rank=64")}
    for name, (nproc, micro) in runs.items():
        res = _run(nproc, mnist_dir, tmp_path / name, *common, micro)
        assert res.returncode == 0, res.stderr[-3000:]
    _assert_close_weights(tmp_path / "accum", tmp_path / "whole")
    _assert_close_weights(tmp_path / "ranks", tmp_path / "whole")
    torch.manual_seed(0)  # the run's initial weights (seed 0)
    initial = build_model("small_cnn_gn", 10).state_dict()
    moved = max((w - initial[k]).abs().max().item() for k, w in _weights(tmp_path / "whole").items())
    assert moved > 100 * 1e-5


ENGINES = {"ddp": (), "fsdp": ("engine=fsdp",), "zero": ("optimizer.zero=1",)}
# The shared 2-rank DDP CS-KD run's settings (conftest `ddp_cskd_run`): the uninterrupted run of every
# engine. On 2 ranks the engines compute bit-identical steps (the same per-rank forward and backward;
# a sum of two gradients is the same in any order; ZeRO-1 and FSDP2 apply the same SGD update to
# each shard), so every engine's resumed run must end exactly where DDP's uninterrupted one does.
ENGINE_RUN = ("method=cskd", "epochs=2", "deterministic=true")
KILL = ("checkpoint-tmp", 2)  # epoch 2's checkpoint written but not renamed: epoch 1's is on disk


@pytest.fixture(scope="module")
def engine_runs(mnist_dir, ddp_cskd_run, tmp_path_factory):
    """The uninterrupted 2-rank run ("straight", DDP's) and, per engine, a 2-rank run SIGKILLed in its
    last checkpoint ("<engine>/killed", holding epoch 1's checkpoint; left for the tests to resume)."""
    root = tmp_path_factory.mktemp("engines")
    shutil.copytree(ddp_cskd_run[0], root / "straight")
    for name, overrides in ENGINES.items():
        res = _run(2, mnist_dir, root / name / "killed", *ENGINE_RUN, *overrides, kill=KILL)
        assert res.returncode == 1, (name, res.stderr[-3000:])
    return root


def test_engines_reach_the_same_parameters_after_one_epoch(engine_runs):
    for name in ("fsdp", "zero"):
        _assert_close_weights(engine_runs / name / "killed", engine_runs / "ddp" / "killed")
    # Every engine saves full, unsharded state: the same keys and shapes as a single process would.
    saved = torch.load(engine_runs / "fsdp" / "killed" / rundir.CHECKPOINT, weights_only=True)
    assert saved["epoch"] == 0 and all(isinstance(v, torch.Tensor) for v in saved["model"].values())
    assert len(saved["optimizer"]["state"]) == len(saved["model"]) - sum("running" in k or "num_batches" in k
                                                                           for k in saved["model"])


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_each_engine_resumes_exactly_after_sigkill(engine_runs, mnist_dir, tmp_path, name):
    killed = tmp_path / "killed"
    shutil.copytree(engine_runs / name / "killed", killed)
    assert not (killed / rundir.SUMMARY).exists()
    res = _run(2, mnist_dir, killed, *ENGINE_RUN, *ENGINES[name])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming" in res.stdout + res.stderr
    straight = _summary(engine_runs / "straight")
    assert _summary(killed)["final"] == straight["final"] and _summary(killed)["best"] == straight["best"]
    _assert_close_weights(killed, engine_runs / "straight", atol=0)


def test_resume_on_another_world_size(engine_runs, mnist_dir, tmp_path):
    """2 -> 1 (an FSDP run resumed by one process) and 1 -> 2 (a single-process run resumed by 2 DDP ranks)."""
    two_to_one = tmp_path / "2to1"
    shutil.copytree(engine_runs / "fsdp" / "killed", two_to_one)
    res = _run(1, mnist_dir, two_to_one, *ENGINE_RUN)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming a 2-process run on 1 processes" in res.stdout
    one_to_two = tmp_path / "1to2"
    res = _run(1, mnist_dir, one_to_two, *ENGINE_RUN, kill=KILL)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    res = _run(2, mnist_dir, one_to_two, *ENGINE_RUN)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming a 1-process run on 2 processes" in res.stdout + res.stderr
    for out in (two_to_one, one_to_two):
        history = [json.loads(line) for line in (out / rundir.METRICS).read_text().splitlines()]
        assert [h["epoch"] for h in history] == [0, 1] and _summary(out)["final"]["top1_err"] < 60


def test_compiled_run_matches_eager_and_its_checkpoint_loads_eagerly(mnist_dir, tmp_path):
    common = ("epochs=2", "method=cskd", "deterministic=true")
    compiled = run_cli(train_args(mnist_dir, tmp_path / "compiled", *common, "compile=true"), timeout=900)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert "compiled" in compiled.stdout
    # The eager run also skips epoch 1's evaluation and writes its files on the training thread.
    eager = run_cli(train_args(mnist_dir, tmp_path / "eager", *common, "eval_every=2", "async_checkpoint=false"))
    assert eager.returncode == 0, eager.stderr[-3000:]
    history = [json.loads(line) for line in (tmp_path / "eager" / rundir.METRICS).read_text().splitlines()]
    assert [h["test"] is None for h in history] == [True, False] and "not evaluated (eval_every)" in eager.stdout
    assert _summary(tmp_path / "eager")["best"]["epoch"] == 1
    c, e = _summary(tmp_path / "compiled")["final"], _summary(tmp_path / "eager")["final"]
    assert abs(c["top1_err"] - e["top1_err"]) < 1.5 and c["nll"] == pytest.approx(e["nll"], rel=0.05)
    # The compiled run's weights are the bare model's: an eager evaluation reproduces its final metrics.
    res = run_cli(["-m", "cskd.eval", str(tmp_path / "compiled"), "--out", str(tmp_path / "eval.json")])
    assert res.returncode == 0, res.stderr[-3000:]
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["top1_err"] == pytest.approx(c["top1_err"], abs=1e-9) and again["nll"] == pytest.approx(c["nll"])
