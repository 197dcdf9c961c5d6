"""The one-line errors of a stage's first forward and of the loss (docs/design.md section 9).

A stage that cannot consume what it receives, or returns something other
than one tensor, or a loss that fails or is not a scalar, stops the run
with a :class:`~timeprest.errors.ShapeError` naming the stage and the
shapes, instead of a traceback from deep inside the module.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from timeprest.errors import ShapeError


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def checked_forward(stage: int, call: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``call(x)``, with its failure or a non-tensor output said in one line."""
    try:
        out = call(x)
    except (RuntimeError, TypeError, ValueError) as exc:
        what = "the input batch" if stage == 0 else f"the output of stage {stage - 1}"
        raise ShapeError(
            f"stage {stage} cannot consume {what} "
            f"(shape {tuple(x.shape)}, dtype {x.dtype}): {_first_line(exc)}"
        ) from exc
    if not isinstance(out, Tensor):
        raise ShapeError(
            f"stage {stage} returned {type(out).__name__}; each stage must return one tensor"
        )
    return out


def checked_loss(
    stage: int, loss_fn: Callable[[Tensor, Tensor], Tensor], out: Tensor, target: Tensor
) -> Tensor:
    """``loss_fn(out, target)``, which must work and be a scalar."""
    try:
        loss = loss_fn(out, target)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ShapeError(
            f"loss_fn failed on the output of stage {stage} (shape {tuple(out.shape)}) "
            f"and the target (shape {tuple(target.shape)}): {_first_line(exc)}"
        ) from exc
    if loss.numel() != 1:
        raise ShapeError(
            f"loss_fn returned shape {tuple(loss.shape)}; it must return a scalar "
            "(use the default mean reduction)"
        )
    return loss
