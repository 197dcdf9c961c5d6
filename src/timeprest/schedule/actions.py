"""Actions: the units of a stage's program, and their text form.

=========  ====================================================
text       meaning
=========  ====================================================
``F3.1``   forward of micro-batch 1 of mini-batch 3
``B3``     backward of all micro-batches of mini-batch 3 (nF1B)
``B3.1``   backward of micro-batch 1 of mini-batch 3
``U3``     optimizer step with mini-batch 3's accumulated gradient
=========  ====================================================

``parse(str(a)) == a`` for every action.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from timeprest.errors import ScheduleError

Kind = Literal["F", "B", "U"]

_TEXT = re.compile(r"^\s*([FBU])(\d+)(?:\.(\d+))?\s*$")


@dataclass(frozen=True, order=True)
class Action:
    """One step of a stage's program.

    ``microbatch`` is ``None`` for a whole-mini-batch backward (``B{t}``) and
    for an update (``U{t}``).
    """

    kind: Kind
    minibatch: int
    microbatch: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("F", "B", "U"):
            raise ScheduleError(f"unknown action kind {self.kind!r}: expected F, B or U")
        if self.minibatch < 0 or (self.microbatch is not None and self.microbatch < 0):
            raise ScheduleError(f"negative index in action {self}")
        if self.kind == "F" and self.microbatch is None:
            raise ScheduleError(
                f"forward F{self.minibatch} needs a micro-batch: F{self.minibatch}.j"
            )
        if self.kind == "U" and self.microbatch is not None:
            raise ScheduleError(f"update U{self.minibatch}.{self.microbatch} takes no micro-batch")

    def __str__(self) -> str:
        if self.microbatch is None:
            return f"{self.kind}{self.minibatch}"
        return f"{self.kind}{self.minibatch}.{self.microbatch}"

    def __repr__(self) -> str:
        return f"Action({str(self)!r})"

    @property
    def is_forward(self) -> bool:
        return self.kind == "F"

    @property
    def is_backward(self) -> bool:
        return self.kind == "B"

    @property
    def is_update(self) -> bool:
        return self.kind == "U"

    def microbatches(self, num_microbatches: int) -> list[int]:
        """The micro-batches this action covers (all of them for ``B{t}``)."""
        if self.microbatch is not None:
            return [self.microbatch]
        if self.kind == "B":
            return list(range(num_microbatches))
        return []


def F(t: int, j: int) -> Action:
    return Action("F", t, j)


def B(t: int, j: int | None = None) -> Action:
    return Action("B", t, j)


def U(t: int) -> Action:
    return Action("U", t)


def parse(text: str) -> Action:
    """Parse the text form (``"F3.1"``, ``"B3"``, ``"U3"``) of an action."""
    m = _TEXT.match(text)
    if m is None:
        raise ScheduleError(
            f"cannot parse action {text!r}: expected F<t>.<j>, B<t>, B<t>.<j> or U<t>"
        )
    kind, t, j = m.group(1), int(m.group(2)), m.group(3)
    return Action(kind, t, None if j is None else int(j))  # type: ignore[arg-type]


def parse_program(text: str) -> list[Action]:
    """Parse a whitespace-separated program, e.g. ``"F0.0 F0.1 B0 U0"``."""
    return [parse(tok) for tok in text.split()]


def format_program(program: list[Action]) -> str:
    return " ".join(str(a) for a in program)
