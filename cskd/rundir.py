"""The run directory: its file names, who writes them, and the summary.json schema.

    <run dir>/
      config.yaml      the resolved config; written first. Same identity: resume; another: refused
      metrics.jsonl    one JSON line per finished epoch: {"epoch", "lr", "train": {...}, "test": {...}};
                       "test" is null in an epoch skipped by `eval_every` (the last epoch is always evaluated)
      checkpoint.pt    the last checkpointed epoch (every `checkpoint_every`-th, and the last): model,
                       optimizer, scheduler, method state, RNG per rank, progress; full, unsharded state,
                       so it resumes on any number of ranks and under any engine
      best.pt          the model of the epoch of lowest test top1_err so far: {"model", "epoch", "test", "classes"}
      test_logits.pt   the last finished epoch's test outputs, the final epoch's once the run is done (ensembles,
                       figures): {"epoch", "logits": (N, C) float16, "labels": (N,) int64} in test-set order;
                       "features": (M, D) float16 penultimate features of the test positions "feature_index"
                       (M,) int64 (`cskd.eval.feature_subset`: the first 100 test samples of 10 evenly spaced
                       classes, M <= 1,000); the dataset's "classes" and "superclass_of_class" (or None).
                       CIFAR-100 / ResNet-18: 2.0 MB logits + 1.0 MB features; ImageNet / ResNet-152: 100 MB
                       logits (50,000 x 1,000) + 4.1 MB features
      best_test_logits.pt  the same for the epoch of best.pt
      train_correct.bits  per epoch, one bit per training sample: classified correctly by its training step
                       (`cskd.sample_log`); CIFAR-100 6.25 kB per epoch, ImageNet 160 kB
      train_probs.f16  with `log_per_sample: true`: per epoch and training sample, the target (label) and the
                       maximum probability of that step, float16; CIFAR-100 200 kB per epoch, ImageNet 5.1 MB
      summary.json     written once, last: the run is done (`build_summary` below)
      reliability.png  the final epoch's reliability diagram
      job.json         written by launch/ (who runs the run, where its log is); not the trainer's
      run.lock         exists while a trainer holds the run dir (`lock`): one writer per run dir

Every file is replaced atomically. This module is the one place that names them; the trainer
builds summary.json with `build_summary` and everything else reads it with `read_summary`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cskd import config as config_mod
from cskd.errors import RunDirError
from cskd.fileio import write_json, write_text
from cskd.lock import DirLock, holder
from cskd.metrics import METRIC_NAMES

CONFIG, CHECKPOINT, BEST, METRICS, SUMMARY, RELIABILITY, JOB, LOCK = (
    "config.yaml", "checkpoint.pt", "best.pt", "metrics.jsonl", "summary.json", "reliability.png", "job.json",
    "run.lock")
TEST_LOGITS, BEST_TEST_LOGITS = "test_logits.pt", "best_test_logits.pt"
TRAIN_CORRECT, TRAIN_PROBS = "train_correct.bits", "train_probs.f16"
# the trainer's files; --force removes them
ARTIFACTS = (CONFIG, CHECKPOINT, BEST, METRICS, SUMMARY, RELIABILITY, TEST_LOGITS, BEST_TEST_LOGITS, TRAIN_CORRECT,
             TRAIN_PROBS)
SUMMARY_SCHEMA = 1
BEST_NOTE = "best = the epoch of lowest test top1_err; it selects on the test set, like the references"


def _saved_identity(path: Path) -> dict:
    try:
        return config_mod.identity_dict(config_mod.from_dict(config_mod.read_yaml(path, "saved config")))
    except Exception as e:  # a hand-edited or foreign file: refuse rather than guess
        raise RunDirError(f"{path} cannot be read as a cskd config ({e}); use another out_dir, or --force") from None


def read_config(run_dir: str | Path) -> config_mod.Config:
    """The resolved config saved in a run dir, validated as any config is."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise RunDirError(f"{run_dir} has no {CONFIG}: not a cskd run dir (give the directory a run was trained into)")
    try:
        return config_mod.from_dict(config_mod.read_yaml(path, "saved config"))
    except Exception as e:
        raise RunDirError(f"{path} cannot be read as a cskd config ({str(e)[:200]}); was it edited by hand?") from None


def check_same_config(cfg: config_mod.Config) -> None:
    """Raise RunDirError if `cfg.out_dir` holds a run of another config (runtime keys aside)."""
    out = Path(cfg.out_dir)
    saved = out / CONFIG
    if saved.exists():
        differs = config_mod.diff_keys(_saved_identity(saved), config_mod.identity_dict(cfg))
        if differs:
            raise RunDirError(f"{out} holds a run with a different config (differs in: {', '.join(differs)}); "
                              f"use another out_dir, or pass --force to overwrite it")
    elif any((out / name).exists() for name in ARTIFACTS):
        raise RunDirError(f"{out} holds run files but no {CONFIG}; use another out_dir, or pass --force")


def run_dir_lock(out_dir: str | Path) -> DirLock:
    """The run dir's exclusive lock, taken by `with` (which creates the dir): held by the one process
    that writes the run dir, released by the OS when it dies. A second writer gets a one-line error
    naming the holder."""
    return DirLock(out_dir, LOCK, "run dir")


def lock_holder(out_dir: str | Path) -> dict | None:
    """Who holds the run dir now ({host, pid, job_id, since}), or None if no live process does."""
    return holder(out_dir, LOCK)


def check_same_data(out_dir: str | Path, saved: dict | None, current: dict) -> None:
    """Refuse to continue a run on other data: `saved` and `current` are the .beton sha256s
    (`DatasetInfo.sha256`) the run started on and those under its data.path now."""
    if saved is None or saved == current:
        return
    changed = [name for name in sorted(set(saved) | set(current)) if saved.get(name) != current.get(name)]
    first = changed[0]
    raise RunDirError(
        f"{out_dir} was trained on other data: {first} had sha256 {str(saved.get(first))[:12]}..., the file under "
        f"data.path now has {str(current.get(first))[:12]}... (the dataset was converted again); resuming would "
        f"mix two datasets: restore the old conversion, or pass --force to start this run over on the new one")


def remove_artifacts(out_dir: str | Path) -> None:
    for name in ARTIFACTS:
        (Path(out_dir) / name).unlink(missing_ok=True)


def remove_stale_temp_files(out_dir: str | Path) -> None:
    """Temp files of atomic writes that a killed writer left behind (`.checkpoint.pt.k3j9.tmp`, as
    large as a checkpoint). Only for the holder of the run dir's lock: no other writer is mid-write."""
    for name in ARTIFACTS:
        for path in Path(out_dir).glob(f".{name}.*.tmp"):
            path.unlink(missing_ok=True)


def prepare(cfg: config_mod.Config, force: bool) -> str:
    """Decide what to do with `cfg.out_dir`: 'new', 'resume' or 'complete'; writes config.yaml.
    The caller holds the run dir's lock (`run_dir_lock`)."""
    out = Path(cfg.out_dir)
    remove_stale_temp_files(out)
    if force:
        remove_artifacts(out)
    saved = out / CONFIG
    check_same_config(cfg)
    if saved.exists():
        if (out / SUMMARY).exists():
            return "complete"
        if (out / CHECKPOINT).exists():
            return "resume"
    write_text(saved, config_mod.dump_yaml(cfg))
    return "new"


def rewrite_metrics(out_dir: str, history: list[dict]) -> None:
    """Make metrics.jsonl hold exactly `history` (after a resume, epochs past the checkpoint go)."""
    write_text(Path(out_dir) / METRICS, "".join(json.dumps(r) + "\n" for r in history))


def append_metrics(out_dir: str, record: dict) -> None:
    with open(Path(out_dir) / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


# --- summary.json ------------------------------------------------------------------------------

def build_summary(cfg: config_mod.Config, *, dataset: str, data_sha256: dict, final: dict, best: dict,
                  reliability: dict, wall_s: float, train_images_per_s: float, world_size: int, device: str) -> dict:
    """The summary.json of a finished run.

    `final` and `best` hold the test metrics (`cskd.metrics.METRIC_NAMES`, `samples`) and their
    `epoch`; `dataset` is the prepared dataset's name (meta.json) and `data_sha256` its files'
    sha256s (which conversion of it), `label` the row name tables use."""
    return {
        "schema": SUMMARY_SCHEMA,
        "dataset": dataset, "data": {"path": cfg.data.path, "sha256": data_sha256},
        "model": cfg.model, "method": cfg.method, "label": cfg.label or cfg.method,
        "seed": cfg.seed, "final": final, "best": best, "best_note": BEST_NOTE,
        "epochs": cfg.epochs, "wall_s": wall_s, "train_images_per_s": train_images_per_s,
        "world_size": world_size, "device": device, "reliability": reliability,
    }


def write_summary(out_dir: str | Path, summary: dict) -> Path:
    path = Path(out_dir) / SUMMARY
    write_json(path, summary)
    return path


@dataclass(frozen=True)
class Summary:
    """A finished run as tables see it (`read_summary`); `raw` is the whole file."""

    path: Path
    dataset: str
    model: str
    method: str
    label: str
    seed: int
    final: dict
    best: dict
    device: str
    raw: dict

    @property
    def reliability(self) -> dict | None:
        return self.raw.get("reliability")

    @property
    def data_identity(self) -> str:
        """Which conversion of the dataset the run used: its files' sha256s (the path if not recorded)."""
        data = self.raw.get("data") or {}
        return json.dumps(data.get("sha256") or data.get("path") or self.dataset, sort_keys=True)


def read_summary(path: str | Path) -> Summary:
    """Read and check a summary.json (a run dir or the file itself); a malformed one is one RunDirError."""
    path = Path(path)
    path = path / SUMMARY if path.is_dir() else path
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunDirError(f"{path} is not readable JSON ({type(e).__name__}: {e}); delete it to re-run the run"
                          ) from None
    problems = [] if isinstance(data, dict) else ["not a JSON object"]
    data = data if isinstance(data, dict) else {}
    for key, kind in (("dataset", str), ("model", str), ("method", str), ("seed", int)):
        if not isinstance(data.get(key), kind):
            problems.append(f"'{key}' missing or not {kind.__name__}")
    for epoch in ("final", "best"):
        metrics = data.get(epoch)
        missing = [m for m in METRIC_NAMES if not isinstance((metrics or {}).get(m), (int, float))]
        if missing:
            problems.append(f"'{epoch}' lacks {', '.join(missing)}")
    if problems:
        raise RunDirError(f"{path} is not a cskd summary ({'; '.join(problems)}); delete it to re-run the run")
    return Summary(path, data["dataset"], data["model"], data["method"], data.get("label") or data["method"],
                   data["seed"], data["final"], data["best"], str(data.get("device", "?")), data)
