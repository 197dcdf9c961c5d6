"""Training runs: ``run_training(TrainConfig(...))``, what ``timeprest train`` calls.

============  ==========================================================
``config``    :class:`TrainConfig`: every setting, its default and check
``rundir``    the run directory: preparing, resuming, its files
``records``   :class:`EpochRow`, the mini-batch log, the summary
``progress``  the progress bar of an epoch
``context``   one process or a torchrun job: what the loop asks of each
``loop``      the training loop, for both engines
============  ==========================================================
"""

from timeprest.train.config import (
    DEVICES,
    ENGINES,
    LR_SCHEDULES,
    OPTIMIZERS,
    RUN_IDENTITY,
    TrainConfig,
    load_config_file,
    write_config_file,
)
from timeprest.train.loop import RunResult, build_pipeline, run_training
from timeprest.train.optim import lr_factor, make_optimizer
from timeprest.train.records import EpochRow, epochs_to_target, read_epochs, summarize
from timeprest.train.rundir import default_run_dir, run_dir_of

__all__ = [
    "DEVICES",
    "ENGINES",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "RUN_IDENTITY",
    "EpochRow",
    "RunResult",
    "TrainConfig",
    "build_pipeline",
    "default_run_dir",
    "epochs_to_target",
    "load_config_file",
    "lr_factor",
    "make_optimizer",
    "read_epochs",
    "run_dir_of",
    "run_training",
    "summarize",
    "write_config_file",
]
