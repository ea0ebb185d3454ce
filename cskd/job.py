"""What a launcher submits: a picklable callable that trains one config in the job's process.

It carries the resolved config as a plain dict and rebuilds (and re-validates) it in the job, so a
job never depends on the submitting process's objects; the run dir makes re-execution resume.
"""
from __future__ import annotations

from cskd.config import from_dict


class TrainJob:
    def __init__(self, config: dict):
        self.config = config

    def __call__(self) -> dict | None:
        from cskd.train import main

        return main(from_dict(self.config))

    def __repr__(self) -> str:
        return f"TrainJob({self.config.get('out_dir')})"
