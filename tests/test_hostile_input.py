"""Hostile and careless input at every entry point: one line `error: ...`, exit 2, nothing written.

Each table row is a command (or a damaged file) and the fragment its one error line must hold.
`assert_refused` (conftest) checks the exit status, that stderr is exactly that one line with no
traceback, and that no file under the given roots was created or changed. The training CLI and the
torch.distributed environment are exercised as real subprocesses, as users run them; the launchers
(launch/grid.py, launch/collect.py) in-process, which is cheaper and runs the same `main`.
"""
import json
import shutil
import socket
import subprocess
import time
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import assert_refused, file_tree, run_cli, train_args

from cskd import checkpoint
from cskd.errors import RunDirError
from launch import collect, grid

# --- python -m cskd.train: the config ------------------------------------------------------------

# Files the config cases point --config at (created by `hostile_files`).
BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary"
DUPLICATE = "model: small_cnn\ndata:\n  path: data/a\n  pipeline: crop\n  path: data/b\n"


@pytest.fixture
def hostile_files(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(BINARY)
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "dup.yaml").write_text(DUPLICATE)
    (tmp_path / "latin1.yaml").write_bytes("label: caf\xe9\n".encode("latin-1"))
    return tmp_path


TRAIN_CASES = [
    (["--config", "{tmp}/binary.yaml"], "is not UTF-8 text (byte 0x89 at offset 0); is it a binary file?"),
    (["--config", "{tmp}/latin1.yaml"], "latin1.yaml is not UTF-8 text (byte 0xe9 at offset 10)"),
    (["--config", "{tmp}/dir.yaml"], "dir.yaml is a directory; give the path of a YAML file"),
    (["--config", "{tmp}/dup.yaml"], "dup.yaml is not valid YAML: key 'path' is given twice (lines 3 and 5"),
    (["lr=[0.1"], "the value of override 'lr=[0.1' is not valid YAML: expected ',' or ']'"),
    (["momentum=.nan"], "config key 'momentum' must be a finite number, got nan from override 'momentum=.nan'"),
    (["lr=.inf"], "config key 'lr' must be a finite number, got inf"),
    (["lr=-1e999"], "config key 'lr' must be a finite number, got -inf"),
    (["method=cskd", "cskd.temperature=.nan"], "config key 'cskd.temperature' must be a finite number"),
    (["seed=-1"], "config key 'seed' must be >= 0 and < 2**63, got -1"),
    ([f"seed={2**63}"], f"config key 'seed' must fit a 64-bit integer (|value| < 2**63), got {2**63}"),
    (["epochs=[1]"], "config key 'epochs' expects int, got [1] (list)"),
    (["out_dir="], "config key 'out_dir' is empty; give a directory"),
    (['out_dir=""'], "config key 'out_dir' is empty; give a directory"),
    (["data.path= "], "config key 'data.path' is empty; give a directory"),
    (['label="cskd\\n#SBATCH --x"'], "config key 'label' holds the control character '\\n'"),
    ([f"threads={2**40}"], "config key 'threads' must be <= 1024"),
    ([f"ece_bins={2**40}"], "config key 'ece_bins' must be <= 10000"),
    (["batch_size=1000000"], "batch.global=1000000 is larger than the 4000 training samples of "),
]


# These go through a real `python -m cskd.train` process (exit status, stderr as a user sees them); the
# other cases call the same CLI function in this process, saving a torch import per case.
IN_A_PROCESS = ("--config {tmp}/binary.yaml", "batch_size=1000000")


@pytest.mark.parametrize("overrides, fragment", TRAIN_CASES, ids=[" ".join(c[0]) for c in TRAIN_CASES])
def test_train_config_errors(mnist_dir, hostile_files, overrides, fragment, capsys):
    from cskd.train import cli

    out = hostile_files / "run"
    before = file_tree(hostile_files)
    args = train_args(mnist_dir, out, *[o.format(tmp=hostile_files) for o in overrides])
    if " ".join(overrides) in IN_A_PROCESS:
        res = run_cli(args, timeout=120)
    else:
        code = cli(args[2:])  # [2:]: not `-m cskd.train`
        res = subprocess.CompletedProcess(args, code, *capsys.readouterr())
    assert_refused(res, fragment, before, hostile_files)
    assert not out.exists()


# --- python -m cskd.train: the torchrun / Slurm environment --------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOCAL = {"MASTER_ADDR": "127.0.0.1"}
# Whatever the test's own environment holds: each case sets exactly what it lists.
UNSET = dict.fromkeys(("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS"), "")
ENV_CASES = [
    ({"WORLD_SIZE": "2", "RANK": "0"}, ("WORLD_SIZE=2 is set but MASTER_ADDR and MASTER_PORT are not: launch with "
                                        "torchrun (it sets them all), or unset WORLD_SIZE, RANK")),
    ({"WORLD_SIZE": "2", **LOCAL}, "WORLD_SIZE=2 is set but MASTER_PORT is not"),
    ({"WORLD_SIZE": "2", "RANK": "first", **LOCAL, "MASTER_PORT": "1"},
     "environment variable RANK='first' is not an integer"),
    ({"WORLD_SIZE": "two"}, "environment variable WORLD_SIZE='two' is not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "2", **LOCAL, "MASTER_PORT": "1"}, "RANK=2 is not below WORLD_SIZE=2"),
    ({"WORLD_SIZE": "2", "RANK": "0", **LOCAL, "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
    ({"WORLD_SIZE": "2", "RANK": "0", **LOCAL, "MASTER_PORT": "1", "CSKD_RENDEZVOUS_TIMEOUT_S": "soon"},
     "CSKD_RENDEZVOUS_TIMEOUT_S='soon' must be a positive number of seconds"),
    # Variables left over in a shell: rank 0 waits for a rank 1 that never comes, rank 1 for a rank 0.
    ({"WORLD_SIZE": "2", "RANK": "0", **LOCAL, "MASTER_PORT": "{port}", "CSKD_RENDEZVOUS_TIMEOUT_S": "3"},
     ("as RANK=0 this process gave up waiting for the other 1 process(es) of WORLD_SIZE=2 to connect "
      "(CSKD_RENDEZVOUS_TIMEOUT_S=3 s")),
    ({"WORLD_SIZE": "2", "RANK": "1", **LOCAL, "MASTER_PORT": "{port}", "CSKD_RENDEZVOUS_TIMEOUT_S": "3"},
     "as RANK=1 this process gave up waiting for rank 0 of WORLD_SIZE=2 to serve it"),
]


# The first case and the two rendezvous timeouts run as real processes; the other cases fail on the
# variables alone, before any connection, and call the CLI function in this process.
ENV_IN_A_PROCESS = (0, len(ENV_CASES) - 2, len(ENV_CASES) - 1)


@pytest.mark.parametrize("case", range(len(ENV_CASES)), ids=[" ".join(f"{k}={v}" for k, v in c[0].items())
                                                              for c in ENV_CASES])
def test_distributed_environment_errors(mnist_dir, tmp_path, case, monkeypatch, capsys):
    from cskd.train import cli

    env, fragment = ENV_CASES[case]
    out = tmp_path / "run"
    port = str(free_port())
    env = {**UNSET, **{k: v.format(port=port) for k, v in env.items()}}
    start = time.monotonic()
    args = train_args(mnist_dir, out)
    if case in ENV_IN_A_PROCESS:
        res = run_cli(args, timeout=120, env=env)  # a hang fails here, after 120 s
    else:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        code = cli(args[2:])  # [2:]: not `-m cskd.train`
        res = subprocess.CompletedProcess(args, code, *capsys.readouterr())
    assert_refused(res, fragment, {}, tmp_path)
    assert not out.exists()
    assert time.monotonic() - start < 60  # the 3 s rendezvous bound holds (torch retries once: ~2x)


# --- checkpoints ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(mnist_dir, tmp_path_factory):
    """A finished 1-epoch run dir (checkpoint.pt, best.pt, summary.json) to damage copies of."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    res = run_cli(train_args(mnist_dir, out), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def damaged_copy(run_dir, dest, name: str, keep: float) -> None:
    """A copy of `run_dir` whose file `name` keeps only the first `keep` fraction of its bytes."""
    shutil.copytree(run_dir, dest)
    data = (dest / name).read_bytes()
    (dest / name).write_bytes(data[:int(len(data) * keep)])


CUTS = [(0.0, "is empty (0 bytes)"), (0.0001, "is truncated ("), (0.5, "is truncated ("),
        (0.999, "is truncated (")]


@pytest.mark.parametrize("keep, fragment", CUTS)
def test_load_names_an_empty_or_truncated_checkpoint_and_the_way_out(trained_run, tmp_path, keep, fragment):
    damaged_copy(trained_run, tmp_path / "run", "checkpoint.pt", keep)
    with pytest.raises(RunDirError) as error:
        checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    message = str(error.value)
    assert fragment in message and "\n" not in message
    assert "cannot be resumed" in message and "delete it to restart the run from scratch, or train again with " \
                                              "--force" in message
    assert torch.load(trained_run / "checkpoint.pt", weights_only=True)["epoch"] == 0  # the original is fine


@pytest.mark.parametrize("keep, fragment", [(0.0, "checkpoint.pt is empty (0 bytes)"),
                                            (0.5, "checkpoint.pt is truncated (")])
def test_resuming_from_a_damaged_checkpoint_is_one_line(mnist_dir, trained_run, tmp_path, keep, fragment):
    """The epoch finished but summary.json is missing, so training resumes: from a cut checkpoint it cannot."""
    run_dir = tmp_path / "run"
    damaged_copy(trained_run, run_dir, "checkpoint.pt", keep)
    (run_dir / "summary.json").unlink()
    before = file_tree(run_dir)
    res = run_cli(train_args(mnist_dir, run_dir), timeout=300)  # the config it was trained with: resume
    assert_refused(res, fragment, before, run_dir)
    assert "delete it to restart the run from scratch" in res.stderr


# --- python -m cskd.eval ----------------------------------------------------------------------------

def eval_result(capsys, *args) -> SimpleNamespace:
    from cskd.eval import main

    code = main([str(a) for a in args])
    return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)


@pytest.mark.parametrize("setup, fragment", [
    ("out_is_dir", "is a directory; give a file name, e.g. --out"),
    ("out_below_file", "is a file, not a directory; give a path in a directory"),
    ("truncated_checkpoint", "checkpoint.pt is truncated ("),
    ("empty_best", "best.pt is empty (0 bytes)"),
])
def test_eval_errors(trained_run, tmp_path, capsys, setup, fragment):
    run_dir, args = trained_run, []
    if setup == "out_is_dir":
        (tmp_path / "eval.json").mkdir()
        args = ["--out", tmp_path / "eval.json"]
    elif setup == "out_below_file":
        (tmp_path / "notadir").write_text("x")
        args = ["--out", tmp_path / "notadir" / "eval.json"]
    elif setup == "truncated_checkpoint":
        run_dir = tmp_path / "run"
        damaged_copy(trained_run, run_dir, "checkpoint.pt", 0.5)
        args = ["--out", tmp_path / "eval.json"]
    else:
        run_dir = tmp_path / "run"
        damaged_copy(trained_run, run_dir, "best.pt", 0.0)
        args = ["--checkpoint", "best", "--out", tmp_path / "eval.json"]
    before = file_tree(tmp_path, trained_run)
    assert_refused(eval_result(capsys, run_dir, *args), fragment, before, tmp_path, trained_run)
    assert not (tmp_path / "eval.json").is_file()


# --- launch/grid.py ---------------------------------------------------------------------------------

BASE = "configs/mnist5k_small_cnn.yaml"


def grid_text(**grid) -> str:
    return yaml.safe_dump({"base": BASE, **grid})


GRID_CASES = [
    ("base: [unclosed\n", [], "is not valid YAML: expected ',' or ']'"),
    (BINARY, [], "is not UTF-8 text (byte 0x89 at offset 0)"),
    ("name: a\nbase: x.yaml\nname: b\n", [], "key 'name' is given twice (lines 1 and 3"),
    ("axes:\n  method: [ce]\n  method: [cskd]\n", [], "key 'method' is given twice"),
    (grid_text(axes=["method", "ce"]), [], ("'axes' must map dotted config keys to values, e.g. axes: {lr: ...}, "
                                            "not a list")),
    (grid_text(overrides=["lr=0.1"]), [], "'overrides' must map dotted config keys to values"),
    (grid_text(resources=["gpu"]), [], "'resources' must map resource names to values"),
    (grid_text(seeds=[0, True]), [], "'seeds' must be a non-empty list of integers from 0 to 2**63 - 1, got [0, True]"),
    (grid_text(seeds=[-1]), [], "'seeds' must be a non-empty list of integers from 0 to 2**63 - 1, got [-1]"),
    (grid_text(seeds=[2**64]), [], "'seeds' must be a non-empty list of integers"),
    (grid_text(seeds=[0, 1, 0]), [], "'seeds' lists 0 twice; each value is one run: remove the duplicate"),
    (grid_text(axes={"method": ["ce", "cskd", "ce"]}), [], "axis 'method' lists 'ce' twice"),
    (grid_text(axes={"cskd.lam": [3, 3.0]}), [], "axis 'cskd.lam' lists 3.0 twice"),
    (grid_text(overrides={"momentum": float("nan")}), [], "config key 'momentum' must be a finite number"),
    (grid_text(name="../../x"), [], "'name' '../../x' is not a plain name"),
    (grid_text(name=".."), [], "'name' '..' is not a plain name"),
    (grid_text(name="demo\n#SBATCH --x"), [], "'name' 'demo\\n#SBATCH --x' holds the control character '\\n'"),
    (grid_text(name="a\rb"), [], "holds the control character '\\r'"),
    (grid_text(overrides={"data.path": "data/.."}), [], ("the folder name of data.path 'data/..', '..' is not a "
                                                         "plain name")),
    (grid_text(overrides={"data.path": "/"}), [], "the folder name of data.path '/', '' is not a plain name"),
    (grid_text(axes={"data.path": ["data/x\x00y"]}), [], "holds the control character '\\x00'"),
    (grid_text(axes={"data": [{"path": "a/../../../etc"}]}), [], "the run label built from its axes' values"),
    (grid_text(axes={"data.path": ["a/mnist5k", "b/mnist5k"]}), [],
     "the runs {data.path='a/mnist5k'} and {data.path='b/mnist5k'} would share the run dir "),
    (grid_text(axes={"lr": [0.1, "0.1"]}), [], "the runs {lr=0.1} and {lr='0.1'} would share the run dir "),
    (grid_text(resources={"partition": "gpu", "sbatch": {"account": "a\n#SBATCH --wrap=evil"}}), [],
     "sbatch flag account='a\\n#SBATCH --wrap=evil' holds the control character '\\n'"),
    (grid_text(resources={"partition": "gpu", "sbatch": {"qos": ["a", "b"]}}), [],
     "sbatch flag qos must have a single value"),
    (grid_text(), ["--partition", "gpu", "--sbatch", "account=a\n#SBATCH --x"],
     "sbatch flag account='a\\n#SBATCH --x' holds the control character"),
    (grid_text(), ["--partition", "gpu", "--sbatch", "acc\nount=a"], "sbatch flag name 'acc\\nount' is not a plain"),
    (grid_text(), ["--partition", "gpu\n#SBATCH --x"], "resources.partition 'gpu\\n#SBATCH --x' holds the control"),
    (grid_text(), ["--partition", "gpu", "--mem-gb", "nan"], "resources.mem_gb must be a positive number"),
    (grid_text(), ["--parallel", "0"], "--parallel must be >= 1 (local runs at a time), got 0"),
    (grid_text(), ["--parallel", "-2"], "--parallel must be >= 1"),
    (grid_text(), ["--partition", "gpu", "--array-parallelism", "0"], "array_parallelism must be an integer >= 1"),
    (grid_text(), ["--out", "{tmp}/afile"], "is a file; give a directory"),
]


@pytest.mark.parametrize("text, flags, fragment", GRID_CASES, ids=[c[2][:40] for c in GRID_CASES])
def test_grid_errors(tmp_path, capsys, text, flags, fragment):
    path = tmp_path / "g.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    (tmp_path / "afile").write_text("not a directory")
    flags = [f.format(tmp=tmp_path) for f in flags]
    out = ["--out", str(tmp_path / "out")] if "--out" not in flags else []
    before = file_tree(tmp_path)
    code = grid.main(["--grid", str(path), *out, *flags])  # no --dry-run: nothing may start
    res = SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)
    assert_refused(res, fragment, before, tmp_path)
    assert not (tmp_path / "out").exists()


def test_grid_distinct_runs_pass(tmp_path):
    """The checks refuse collisions, not grids: distinct folder names, seeds and values expand as before."""
    path = tmp_path / "g.yaml"
    path.write_text(grid_text(name="ok", axes={"data.path": ["a/mnist5k", "b/mnist5k_b"], "lr": [0.1, 0.05]},
                              seeds=[0, 1]))
    root, runs = grid.expand(path, tmp_path / "out")
    dirs = {r.out_dir for r in runs}
    assert len(runs) == len(dirs) == 8 and all(d.is_relative_to(root) for d in dirs)


# --- launch/collect.py --------------------------------------------------------------------------------

METRICS = dict.fromkeys(("top1_err", "top5_err", "nll", "ece", "aurc", "eaurc", "r_at_1"), 1.0)


def write_summary(run_dir, seed: int, **extra) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({
        "dataset": "d", "model": "m", "method": "ce", "seed": seed, "final": {**METRICS, "top1_err": 5.0 + seed},
        "best": METRICS, "device": "cpu", **extra}))


DAMAGE = [
    ("seed9/summary.json", "{\"dataset\": \"d\", \"mod", "seed9/summary.json`: is not readable JSON"),
    ("seed9/summary.json", "[1, 2]", "seed9/summary.json`: is not a cskd summary (not a JSON object"),
    ("seed9/summary.json", "\xff\xfe", "seed9/summary.json`: is not readable JSON"),
    ("seed9/summary.json", json.dumps({"dataset": "d", "model": "m", "method": "ce", "seed": 9, "final": METRICS,
                                       "best": METRICS, "reliability": {"count": [1]}}),
     "seed9/summary.json`: 'reliability' lacks equal-length lists"),
    ("seed9/summary.json", json.dumps({"dataset": "d", "model": "m", "method": "ce", "seed": 9, "final": METRICS,
                                       "best": METRICS, "data": "x"}), "seed9/summary.json`: 'data' is not a JSON"),
    ("grid.json", "{\"name\": \"g\", \"runs\": [", "grid.json`: is not valid JSON"),
    ("grid.json", json.dumps({"name": "g", "runs": [{"run_id": "x"}]}), "grid.json`: is not a grid manifest"),
]


@pytest.mark.parametrize("name, content, listed", DAMAGE, ids=[f"{d[0]}:{d[1][:20]}" for d in DAMAGE])
def test_collect_lists_damaged_files_and_still_prints_the_table(tmp_path, capsys, name, content, listed):
    for seed in (0, 1):
        write_summary(tmp_path / f"seed{seed}", seed)
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_bytes(content.encode("latin-1") if content.startswith("\xff") else content.encode())
    assert collect.main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "| ce | 5.50±0.71 n=2 |" in out  # the two good runs, whatever the damaged file says
    assert "**Unreadable files** (1), left out of the tables above:" in out and listed in out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: 1 summary.json/grid.json file(s)"), err
    assert (tmp_path / "results.md").read_text() == out
    assert collect.main([str(tmp_path), "--status"]) == 0 and listed in capsys.readouterr().out


def test_collect_in_a_read_only_dir_prints_the_table_and_says_what_it_could_not_write(tmp_path, capsys):
    """results.md and results.csv cannot be replaced (here: directories stand where they go; the same
    OSError as a read-only dir, which root would not get): the table is printed, one warning names them."""
    for seed in (0, 1):
        write_summary(tmp_path / f"seed{seed}", seed, reliability={"edges": [0, 0.5, 1], "count": [1, 1],
                                                                   "accuracy": [0, 1], "confidence": [0.2, 0.9]})
    (tmp_path / "results.md").mkdir()
    (tmp_path / "results.csv").mkdir()
    assert collect.main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "| ce | 5.50±0.71 n=2 |" in out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: could not write {tmp_path / 'results.md'}, "
                                                   f"{tmp_path / 'results.csv'} ("), err
    assert lines[0].endswith("the report is printed only")
    assert (tmp_path / "reliability_d_m.png").is_file()  # what could be written was
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind


def test_collect_file_names_stay_in_the_root(tmp_path, capsys):
    """A summary's dataset name ends up in a PNG's file name: '../' in it must not write elsewhere."""
    root = tmp_path / "root"
    write_summary(root / "r", 0, dataset="../../../escape", reliability={
        "edges": [0, 1], "count": [1], "accuracy": [1.0], "confidence": [0.9]})
    assert collect.main([str(root)]) == 0
    capsys.readouterr()
    assert [p.name for p in tmp_path.iterdir()] == ["root"]
    assert len(list(root.glob("reliability_*_m.png"))) == 1


@pytest.mark.parametrize("damage, code", [(None, 0), ("failed", 1), ("corrupt summary", 1)])
def test_launcher_exit_status_says_whether_every_run_finished(tmp_path, capsys, damage, code):
    """`_finish`, where the local launcher and Slurm --wait end: exit 1 unless every run is done (a run
    whose summary.json is unreadable is not). tests/test_grid.py also checks it on a real failed run."""
    runs = [grid.Run(SimpleNamespace(out_dir=str(tmp_path / f"seed{seed}")), f"id{seed}") for seed in (0, 1)]
    write_summary(tmp_path / "seed0", 0)
    if damage == "failed":
        (tmp_path / "seed1").mkdir()
        (tmp_path / "seed1" / "job.json").write_text(json.dumps(
            {"scheduler": "local", "job_id": "1", "state": "FAILED", "reason": "NonFiniteLossError: nan"}))
    else:
        write_summary(tmp_path / "seed1", 1)
        if damage:
            (tmp_path / "seed1" / "summary.json").write_text("{")
    assert grid._finish(tmp_path, False, runs) == code
    err = capsys.readouterr().err
    assert ("seed1" in err) == bool(code) and "Traceback" not in err
