"""One stage: its micro-batch inputs (io), its weights (weights) and its computations (runner)."""

from timeprest.stage.io import (
    Batches,
    Minibatch,
    NoBatches,
    SplitBatches,
    StreamedBatches,
    microbatch_rows,
)
from timeprest.stage.runner import LossFn, OptimizerFactory, StageRunner
from timeprest.stage.weights import microbatch_seed, parameter_slots

__all__ = [
    "Batches",
    "LossFn",
    "Minibatch",
    "NoBatches",
    "OptimizerFactory",
    "SplitBatches",
    "StageRunner",
    "StreamedBatches",
    "microbatch_rows",
    "microbatch_seed",
    "parameter_slots",
]
