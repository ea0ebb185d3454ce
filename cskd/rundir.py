"""The run directory: config.yaml, checkpoint.pt, metrics.jsonl, summary.json, reliability.png.

A run dir belongs to one config. Re-running with the same config resumes (or reports the finished
run); a different config is refused unless `--force`, which removes only the files listed here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from cskd import config as config_mod
from cskd.errors import RunDirError
from cskd.fileio import write_text

CONFIG, CHECKPOINT, METRICS, SUMMARY, RELIABILITY = (
    "config.yaml", "checkpoint.pt", "metrics.jsonl", "summary.json", "reliability.png")
ARTIFACTS = (CONFIG, CHECKPOINT, METRICS, SUMMARY, RELIABILITY)


def _saved_identity(path: Path) -> dict:
    try:
        saved = yaml.safe_load(path.read_text())
        return config_mod.identity_dict(config_mod.from_dict(saved))
    except Exception as e:  # a hand-edited or foreign file: refuse rather than guess
        raise RunDirError(f"{path} cannot be read as a cskd config ({e}); use another out_dir, or --force") from None


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


def prepare(cfg: config_mod.Config, force: bool) -> str:
    """Decide what to do with `cfg.out_dir`: 'new', 'resume' or 'complete'; writes config.yaml."""
    out = Path(cfg.out_dir)
    if force:
        for name in ARTIFACTS:
            (out / name).unlink(missing_ok=True)
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
