"""Estimated durations of actions, used to order asynchronous schedules and to replay them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from timeprest.errors import ConfigError
from timeprest.schedule.actions import Action


@dataclass(frozen=True)
class Costs:
    """Per-stage durations (any time unit).

    ``forward[s]`` is the time of one micro-batch forward at stage ``s`` and
    ``backward[s]`` the time of one micro-batch backward; a whole-mini-batch
    backward ``B{t}`` takes ``N * backward[s]``. ``update[s]`` is the time of
    ``U`` (0 by default). ``comm[s]`` is the delay for a message to cross from
    stage ``s`` to ``s+1`` (or back). With ``paper=True`` every action, ``B{t}``
    included, takes one unit: the idealisation drawn in the TiMePReSt papers.
    """

    forward: tuple[float, ...]
    backward: tuple[float, ...]
    update: tuple[float, ...] = ()
    comm: tuple[float, ...] = ()
    paper: bool = False
    name: str = "custom"
    _w: int = field(init=False, repr=False, default=0)

    def __post_init__(self) -> None:
        w = len(self.forward)
        object.__setattr__(self, "_w", w)
        if w < 1:
            raise ConfigError("costs need at least one stage")
        if len(self.backward) != w:
            raise ConfigError(
                f"costs: {w} forward times but {len(self.backward)} backward times; give one per stage"
            )
        if not self.update:
            object.__setattr__(self, "update", (0.0,) * w)
        if not self.comm:
            object.__setattr__(self, "comm", (0.0,) * max(w - 1, 0))
        for label, values in (("forward", self.forward), ("backward", self.backward)):
            if any(not (v > 0) for v in values):
                raise ConfigError(f"costs: every {label} time must be > 0, got {list(values)}")
        if any(v < 0 for v in (*self.update, *self.comm)):
            raise ConfigError("costs: update and communication times must be >= 0")
        if len(self.update) != w or len(self.comm) != max(w - 1, 0):
            raise ConfigError(
                f"costs: need {w} update times and {max(w - 1, 0)} communication times "
                f"for {w} stages, got {len(self.update)} and {len(self.comm)}"
            )

    @property
    def num_stages(self) -> int:
        return self._w

    @classmethod
    def uniform(
        cls, num_stages: int, forward: float = 1.0, backward: float = 2.0, comm: float = 0.0
    ) -> Costs:
        return cls(
            forward=(float(forward),) * num_stages,
            backward=(float(backward),) * num_stages,
            comm=(float(comm),) * max(num_stages - 1, 0),
            name="default" if (forward, backward, comm) == (1.0, 2.0, 0.0) else "uniform",
        )

    @classmethod
    def paper_units(cls, num_stages: int) -> Costs:
        return cls(
            forward=(1.0,) * num_stages, backward=(1.0,) * num_stages, paper=True, name="paper"
        )

    def duration(self, stage: int, action: Action, num_microbatches: int) -> float:
        if action.kind == "U":
            return 0.0 if self.paper else self.update[stage]
        if self.paper:
            return 1.0
        if action.kind == "F":
            return self.forward[stage]
        n = 1 if action.microbatch is not None else num_microbatches
        return n * self.backward[stage]

    def comm_delay(self, src: int, dst: int) -> float:
        """Delay of a message between neighbouring stages ``src`` and ``dst``."""
        if src == dst:
            return 0.0
        return self.comm[min(src, dst)]


CostSpec = str | Costs | Sequence[Sequence[float]]

COST_MODES = ("default", "paper")


def resolve_costs(spec: CostSpec | None, num_stages: int) -> Costs:
    """Turn ``"default"``, ``"paper"``, a :class:`Costs` or ``(forward, backward)`` lists into Costs."""
    if spec is None or spec == "default":
        return Costs.uniform(num_stages)
    if spec == "paper":
        return Costs.paper_units(num_stages)
    if isinstance(spec, Costs):
        if spec.num_stages != num_stages:
            raise ConfigError(
                f"costs are given for {spec.num_stages} stages but the pipeline has {num_stages}"
            )
        return spec
    if isinstance(spec, str):
        raise ConfigError(
            f"unknown costs {spec!r}: expected one of {', '.join(COST_MODES)}, "
            "a Costs object or (forward, backward) per-stage lists"
        )
    try:
        fwd, bwd = spec
        costs = Costs(forward=tuple(float(v) for v in fwd), backward=tuple(float(v) for v in bwd))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"cannot read costs {spec!r}: expected (forward, backward) lists"
        ) from exc
    return resolve_costs(costs, num_stages)
