"""Checkpoints: everything needed to continue a run bit-exactly from an epoch boundary."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from cskd.fileio import atomic_path


def rng_state() -> dict:
    """The state of every random number generator this process may draw from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save(path: str | Path, state: dict) -> None:
    """Write a checkpoint atomically (temp file + rename): a crash leaves the previous one intact."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path: str | Path) -> dict:
    # weights_only=False: the checkpoint holds RNG states (numpy arrays, tuples) written by this code.
    return torch.load(path, map_location="cpu", weights_only=False)
