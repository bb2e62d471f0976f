"""``distill.launch.TrainJob``, where grids submitted before the package's layout (2026-12-04) pickled it: submitit
unpickles a job by this name when SLURM requeues it, so the name stays (the job is ``sweeps.launch.TrainJob``)."""
from .sweeps.launch import TrainJob

__all__ = ['TrainJob']
