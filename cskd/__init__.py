"""cskd: class-wise self-knowledge distillation (CS-KD) and its relatives, reproducible from a laptop to Slurm."""

__version__ = "0.1.0"
