"""``distill.run_dir.RunDir``, where grids submitted before the package's layout (2026-12-04) pickled the run
directory of each ``TrainJob``: the name stays so that a requeued job unpickles (the class is
``runs.directory.RunDir``)."""
from .runs.directory import RunDir

__all__ = ['RunDir']
