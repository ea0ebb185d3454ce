"""What a launcher submits: a picklable, checkpointable callable that trains one config.

It carries the resolved config as a plain dict and rebuilds (and re-validates) it in the job, so a
job never depends on the submitting process's objects. All of a run's state lives in its run dir,
so every way a job can be restarted resumes from the last epoch checkpoint:
- preemption or time limit: submitit catches Slurm's signal, calls `checkpoint()` (which resubmits
  this same callable) and requeues the job;
- an external `scontrol requeue` or a node failure (SIGKILL, no `checkpoint()` call): Slurm reruns
  the original pickle, which is this same callable too.
"""
from __future__ import annotations

import os

import submitit

from cskd.config import from_dict


class TrainJob(submitit.helpers.Checkpointable):
    def __init__(self, config: dict):
        self.config = config

    def __call__(self) -> dict | None:
        from cskd.train import main

        if os.environ.get("SLURM_JOB_ID") and submitit.JobEnvironment().num_tasks > 1:
            # One Slurm task per process: export RANK/WORLD_SIZE/LOCAL_RANK and MASTER_ADDR (the first
            # node) / MASTER_PORT (derived from the job id) for torch.distributed's env:// init.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return main(from_dict(self.config))

    def __repr__(self) -> str:
        return f"TrainJob({self.config.get('out_dir')})"
