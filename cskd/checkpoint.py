"""Checkpoints: everything needed to continue a run bit-exactly from an epoch boundary.

Run dirs travel between people, so their torch files are loaded with `weights_only=True`: only
tensors and plain Python values are unpickled, never code. Everything saved here is therefore
made of those (the numpy RNG state is stored as a tensor, the progress as a plain dict).
"""
from __future__ import annotations

import copy
import dataclasses
import pickle
import random
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cskd import rundir
from cskd.errors import DataError, RunDirError
from cskd.fileio import atomic_path


@dataclass
class Progress:
    """What a run has done so far; saved with every checkpoint, restored on resume."""

    epoch: int = -1  # the last finished epoch
    history: list[dict] = field(default_factory=list)  # the metrics.jsonl records, one per epoch
    best: dict | None = None  # test metrics of the epoch of lowest test top1_err so far, with its "epoch"
    final_bins: dict | None = None  # reliability bins of the last finished epoch
    wall_s: float = 0.0
    train_s: float = 0.0
    train_images: int = 0

    def record(self, epoch: int, lr: float, train: dict, test: dict | None, bins: dict | None,
               wall_s: float) -> tuple[dict, bool]:
        """Add a finished epoch; returns its metrics.jsonl record and whether it is the new best.

        `test` is None for an epoch that was not evaluated (`eval_every`): its record says so
        (`"test": null`) and it cannot be the best."""
        record = {"epoch": epoch, "lr": lr, "train": train, "test": test}
        self.epoch = epoch
        self.history.append(record)
        self.wall_s += wall_s
        self.train_s += train["time_s"]
        self.train_images += train["images"]
        if test is None:
            return record, False
        self.final_bins = bins
        improved = self.best is None or test["top1_err"] < self.best["top1_err"]
        if improved:
            self.best = {**test, "epoch": epoch}
        return record, improved

    @classmethod
    def from_checkpoint(cls, saved: dict) -> "Progress":
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls)})


def rng_state(device: torch.device = torch.device("cpu")) -> dict:
    """The state of every random number generator this process may draw from, as tensors and plain
    values: only its own GPU's (`device`), since each rank draws on its device alone (saving every
    visible GPU's state would make N ranks save N x N states and initialise CUDA contexts on all)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device = torch.device("cpu")) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and isinstance(state.get("cuda"), torch.Tensor):
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_cpu(state):
    """A copy of a (nested) state on the CPU, sharing nothing with the live tensors: what a background
    save writes while training goes on changing them."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_cpu(v) for v in state)
    return copy.deepcopy(state)


class BackgroundWriter:
    """Runs one write job at a time on a thread, so the next epoch trains while files are written.

    `submit` first waits for the previous job: files are written in epoch order and at most one
    epoch's state is held in memory. A job's error is raised by the next `submit` or by `join`."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, job) -> None:
        self.join()
        self._thread = threading.Thread(target=self._run, args=(job,), name="cskd-checkpoint", daemon=False)
        self._thread.start()

    def _run(self, job) -> None:
        try:
            job()
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, raised there
            self._error = e

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def save(path: str | Path, state: dict) -> None:
    """Write a torch file atomically (temp file + rename): a crash leaves the previous one intact."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


# What to do about a checkpoint that cannot be loaded: atomic saves replace the previous one, so
# there is never an older copy to fall back to.
_RECOVER = ("cskd keeps no earlier copy of it, so the run cannot be resumed or evaluated from it: delete it to "
            "restart the run from scratch, or train again with --force")


def load(path: str | Path) -> dict:
    """A checkpoint or best.pt, unpickling only tensors and plain values (a crafted file cannot run code).

    A file that cannot be loaded is one RunDirError saying why (empty, truncated, unreadable, not a
    torch file) and what to do."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunDirError(f"{path} holds more than tensors and plain values ({first[:160]}); it is not loaded, "
                          f"since unpickling it could run code (a file from an older cskd, or a crafted one); "
                          f"re-create it (train with --force)") from None
    except OSError as e:
        raise RunDirError(f"{path} cannot be read ({e.strerror or type(e).__name__}); check that it is a file "
                          f"you may read") from None
    except Exception as e:  # noqa: BLE001 - the file is the only input here: whatever torch chokes on, it is the file
        raise RunDirError(f"{path} {_damage(Path(path), e)}; {_RECOVER}") from None


def _damage(path: Path, error: Exception) -> str:
    """What is wrong with a torch file that failed to load (torch.save writes a zip archive)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            starts_as_zip = f.read(4) == b"PK\x03\x04"
        truncated = starts_as_zip and not zipfile.is_zipfile(path)
    except OSError:  # gone or unreadable since torch opened it: say what torch said
        size, truncated = -1, False
    if size == 0:
        return "is empty (0 bytes): its write never completed (a full disk, or a copy cut short)"
    if truncated:
        return (f"is truncated ({size} bytes, the end of its zip archive is missing): a copy or write was cut "
                f"short")
    detail = (str(error).strip().splitlines() or [""])[0][:120]
    return f"is corrupt or not a torch file ({type(error).__name__}: {detail})"


def save_best(out_dir: str | Path, model_state: dict, epoch: int, metrics: dict, classes: list[str]) -> None:
    """best.pt: the model only (no optimizer), with its epoch, the test metrics it was selected by
    and the class names of its outputs."""
    save(Path(out_dir) / rundir.BEST, {"model": model_state, "epoch": epoch, "test": metrics, "classes": classes})


def save_test_logits(path: str | Path, epoch: int, outputs: dict) -> None:
    """test_logits.pt / best_test_logits.pt: one epoch's test logits in float16 (what an ensemble
    or a figure needs: softmax of float16 logits is exact to ~1e-3 relative) and the labels; where
    `outputs` has them, the kept penultimate features (float16) and their test positions, and the
    class names and superclasses of the dataset (`cskd.rundir` lists the keys)."""
    saved = {"epoch": epoch, "logits": outputs["logits"].to(torch.float16).cpu(), "labels": outputs["labels"].cpu()}
    if "features" in outputs:
        saved |= {"features": outputs["features"].to(torch.float16).cpu(),
                  "feature_index": outputs["feature_index"].cpu()}
    saved |= {key: outputs.get(key) for key in ("classes", "superclass_of_class")}
    save(path, saved)


def load_weights(run_dir: str | Path, which: str) -> dict:
    """A run dir's `final` (checkpoint.pt) or `best` (best.pt) file, checked to hold `model` and `epoch`."""
    name = {"final": rundir.CHECKPOINT, "best": rundir.BEST}[which]
    path = Path(run_dir) / name
    if not path.is_file():
        other = " (or --checkpoint final: runs trained before best.pt existed have none)" if which == "best" else ""
        raise RunDirError(f"{run_dir} has no {name}; train the run for at least one epoch first{other}")
    saved = load(path)
    if not (isinstance(saved, dict) and isinstance(saved.get("model"), dict) and isinstance(saved.get("epoch"), int)):
        raise RunDirError(f"{path} is not a cskd checkpoint (no model state and epoch); re-create it (--force)")
    return saved


def saved_outputs(net: torch.nn.Module, state: dict) -> int | None:
    """How many classes the saved weights `state` of `net` predict: the rows of its head's weight, found
    under the name the head has in `net` (a wrapper such as BYOT's stores it as `net.head.weight`)."""
    weight = net.head.weight
    name = next(n for n, p in net.named_parameters() if p is weight)
    saved = state.get(name)
    return saved.shape[0] if isinstance(saved, torch.Tensor) and saved.dim() > 0 else None


def load_net_state(net: torch.nn.Module, state: dict, source: str, cfg) -> None:
    """Load the saved weights `state` into `net` (built by `cskd.methods.build_net(cfg, ...)`), or a
    one-line DataError: `source` (e.g. "the weights in runs/x") do not fit the config's model and method."""
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise DataError(f"{source} do not fit model={cfg.model} method={cfg.method} for "
                        f"{net.head.weight.shape[0]} classes "
                        f"({str(e).splitlines()[0][:200]})") from None
