"""`python -m datasets_prep NAME ... --slurm` against a real Slurm (the local one of slurm/start_local.sh).

Skipped, with the reason, where no Slurm controller answers. Every wait has a deadline.
"""
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, assert_refused, file_tree, run_cli, slurm_missing, wait_for
from datasets_prep.__main__ import main as prep_main
from datasets_prep.submit import job_argv
from launch import slurm


MISSING = slurm_missing()
needs_slurm = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))

SLURM = ["--slurm", "--partition", "cpu", "--cpus-per-task", "1", "--time", "10"]
CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


def prep(*args: str, timeout: float = 120):
    return run_cli(["-m", "datasets_prep", *map(str, args)], timeout=timeout)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def visible(out: Path) -> list[str]:
    """What a reader of --out sees: everything but the converter's own `.prep-*` files."""
    return sorted(p.name for p in out.iterdir() if not p.name.startswith(".prep-")) if out.exists() else []


def cub_replica(root: Path, n: int) -> Path:
    """A CUB-200-2011 layout of `n` 500x375 JPEGs (hard links to one file: made in a blink, each decoded
    anew), enough for a 1-worker conversion of ~10 s."""
    cub, one = root / "CUB_200_2011", root / "one.jpg"
    cub.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(one, quality=90)
    lines = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": []}
    for i in range(1, n + 1):
        name = CUB_CLASSES[(i - 1) % 3]
        rel = f"{name}/{name[4:]}_{i:04d}.jpg"
        (cub / "images" / name).mkdir(parents=True, exist_ok=True)
        os.link(one, cub / "images" / rel)
        lines["images.txt"].append(f"{i} {rel}")
        lines["image_class_labels.txt"].append(f"{i} {(i - 1) % 3 + 1}")
        lines["train_test_split.txt"].append(f"{i} {int(i % 4 != 0)}")
    for name, rows in lines.items():
        (cub / name).write_text("\n".join(rows) + "\n")
    (cub / "classes.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(CUB_CLASSES, 1)))
    return root


@needs_slurm
def test_job_converts_like_a_local_run(tmp_path):
    job_out, local_out = tmp_path / "job" / "mnist5k", tmp_path / "local" / "mnist5k"
    started = time.monotonic()
    job = subprocess.Popen([sys.executable, "-m", "datasets_prep", "mnist5k", "--out", str(job_out), *SLURM, "--wait"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    local = prep("mnist5k", "--out", local_out, "--workers", 1)  # meanwhile, on this machine
    stdout, stderr = job.communicate(timeout=120)
    assert local.returncode == 0, local.stderr[-2000:]
    assert job.returncode == 0, stdout[-2000:] + stderr[-2000:]
    print(f"job conversion: {time.monotonic() - started:.1f} s")

    log = Path(re.search(r"^log: (.+)$", stdout, re.M)[1])
    assert log.is_relative_to(tmp_path / "job" / "prep-logs") and log.is_file()  # next to --out, not in it
    assert "mnist5k: wrote" in stdout and "train: 4000 images" in stdout  # the job's own summary
    followed = stderr.splitlines()  # the job's log: its command line, then the progress
    assert f"python -m datasets_prep mnist5k --out {job_out} --workers 1" in followed and "images" in stderr
    assert visible(job_out) == ["meta.json", "test.beton", "train.beton"]
    for name in ("train.beton", "test.beton"):
        assert digest(job_out / name) == digest(local_out / name), name
    got, want = (json.loads((d / "meta.json").read_text()) for d in (job_out, local_out))
    assert (got["classes"], got["counts"]) == (want["classes"], want["counts"])


@needs_slurm
def test_cancelled_job_leaves_no_dataset_and_the_rerun_succeeds(tmp_path):
    src, out = cub_replica(tmp_path / "src", 3000), tmp_path / "out" / "cub"
    command = ["cub200", "--src", src, "--out", out, "--allow-count-mismatch", "--max-side", 160, *SLURM]
    first = prep(*command)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "tail -F" in first.stdout  # without --wait: the job id, its log and how to follow it
    job_id = re.search(r"submitted job (\d+)", first.stdout)[1]
    log = Path(re.search(r"^log: (.+)$", first.stdout, re.M)[1])

    wait_for(lambda: slurm.job_states([job_id]).get(job_id) == "RUNNING", 60, "the job to run", poll=0.5)
    wait_for(lambda: log.is_file() and re.search(r"\d+ images", log.read_text()), 60, "the conversion's progress",
             poll=0.5)
    slurm.cancel([job_id])  # TERM, then KILL after KillWait: mid-conversion either way
    state = wait_for(lambda: (s := slurm.job_states([job_id]).get(job_id)) not in slurm.ACTIVE and s, 60,
                     "the job to end", poll=0.5)
    assert state == "CANCELLED"
    assert "wrote" not in log.with_suffix(".out").read_text(), "finished before the kill: make the source bigger"
    assert visible(out) == []  # no meta.json, no .beton: at most the killed attempt's staging folder

    # the rerun here, on both cores (a job's --wait path is the first test's): it must clean up and succeed
    again = prep(*command[:command.index("--slurm")], "--workers", 2, timeout=180)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "cub200: wrote" in again.stdout and "train: 2250 images" in again.stdout
    assert visible(out) == ["meta.json", "test.beton", "train.beton"]
    assert not [p for p in out.iterdir() if p.name.startswith(".prep-") and p.is_dir()]  # leftovers removed


@needs_slurm
@pytest.mark.parametrize("flags, fragment", [
    (["--slurm", "--partition", "cpu", "--time", "1-"], "time limit '1-'"),
    (["--slurm", "--partition", "no-such-partition"], "invalid partition"),
    (["--slurm"], "--slurm needs --partition"),
])
def test_refusals_submit_nothing(tmp_path, flags, fragment):
    before = file_tree(tmp_path)
    res = prep("mnist5k", "--out", tmp_path / "mnist5k", *flags, timeout=120)
    assert_refused(res, fragment, before, tmp_path)  # submitit writes its log folder before sbatch: none here


def test_the_job_gets_the_command_line_without_the_slurm_options():
    argv = ["cub200", "--src", "x", "--slurm", "--partition=cpu", "--out", "o", "--sbatch", "account=a", "--wait",
            "--seed", "-1", "--time", "1-00:00", "--cpus-per-task", "4", "--mem-gb", "2", "--workers", "8"]
    assert job_argv(argv, 4) == ["cub200", "--src", "x", "--out", "o", "--seed", "-1", "--workers", "8",
                                 "--workers", "4"]  # argparse: the last --workers wins
    assert job_argv(["mnist5k", "--out", "o", "--slurm", "--partition", "cpu"], None) == ["mnist5k", "--out", "o"]


def test_a_slurm_option_without_slurm_is_refused(tmp_path, capsys):
    assert prep_main(["mnist5k", "--out", str(tmp_path / "d"), "--partition", "cpu"]) == 2
    assert capsys.readouterr().err == "error: --partition only applies to a Slurm job: add --slurm\n"
    assert not (tmp_path / "d").exists()
