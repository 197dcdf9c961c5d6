"""The cost model: what one stage costs in time and memory, and its JSON file format.

A cost file looks like this (``version`` is the format version; times are in
seconds per micro-batch, sizes in bytes)::

    {
      "format": "timeprest-costs",
      "version": 1,
      "input_bytes": 3072,
      "link": {"bandwidth": 1.0e10, "latency": 2e-05},
      "stages": [
        {"forward_time": 0.0012, "backward_time": 0.0025, "update_time": 0.0003,
         "output_bytes": 65536, "weight_bytes": 1048576,
         "optimizer_state_bytes": 1048576, "saved_activation_bytes": 262144},
        ...
      ],
      "meta": {"model": "resnet8", "device": "cpu", ...}
    }

``output_bytes`` of stage s is the activation it sends to stage s+1 for one
micro-batch (the gradient sent back is the same size); the time of one
message is ``latency + output_bytes / bandwidth`` (``bandwidth: null`` means
infinitely fast, so only the latency counts). ``meta`` is free-form and is
kept as given.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from timeprest.errors import ConfigError
from timeprest.schedule import Costs

FORMAT_NAME = "timeprest-costs"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class StageCost:
    """Time and memory of one stage, per micro-batch unless said otherwise."""

    forward_time: float
    """Seconds for the forward of one micro-batch."""
    backward_time: float
    """Seconds for the backward of one micro-batch."""
    update_time: float = 0.0
    """Seconds for one optimizer step (once per mini-batch)."""
    output_bytes: int = 0
    """Bytes of the activation sent to the next stage per micro-batch (0 at the last stage)."""
    weight_bytes: int = 0
    """Bytes of one version of the stage's trainable parameters."""
    optimizer_state_bytes: int = 0
    """Bytes of the optimizer state (momentum, Adam moments); held all the time."""
    saved_activation_bytes: int = 0
    """Bytes autograd saves for the backward of one micro-batch (weights excluded)."""

    def __post_init__(self) -> None:
        for name in ("forward_time", "backward_time"):
            v = getattr(self, name)
            if not _is_number(v) or not (v > 0) or math.isinf(v):
                raise ConfigError(f"{name} must be a finite number > 0 seconds, got {v!r}")
        if not _is_number(self.update_time) or not (0 <= self.update_time < math.inf):
            raise ConfigError(f"update_time must be a finite number >= 0, got {self.update_time!r}")
        for name in (
            "output_bytes",
            "weight_bytes",
            "optimizer_state_bytes",
            "saved_activation_bytes",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {v!r}")


@dataclass(frozen=True)
class CostModel:
    """Per-stage costs of a pipeline plus the link between neighbouring stages.

    Convert to :class:`timeprest.schedule.Costs` (time only) with
    :meth:`to_costs`; the memory fields are used by the simulator's memory
    model.
    """

    stages: tuple[StageCost, ...]
    input_bytes: int = 0
    """Bytes of one micro-batch of input to stage 0 (what ``recompute`` saves there)."""
    bandwidth: float | None = None
    """Link bandwidth in bytes per second; ``None`` is infinitely fast."""
    latency: float = 0.0
    """Seconds every message between neighbouring stages takes on top of its transfer."""
    overhead: float = 0.0
    """Seconds of a stage's own time that each message it sends or receives costs (the
    ``o`` of the LogP model, Culler et al. 1993): packing, copying, posting. It adds
    to the stage's forward and backward times, one message per neighbour per
    micro-batch, while latency and transfer only delay the receiver."""
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)
    """Free-form facts about where the costs come from (model, device, ...)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages:
            raise ConfigError("a cost model needs at least one stage")
        if not isinstance(self.input_bytes, int) or self.input_bytes < 0:
            raise ConfigError(f"input_bytes must be an integer >= 0, got {self.input_bytes!r}")
        if self.bandwidth is not None and (
            not _is_number(self.bandwidth) or not (self.bandwidth > 0)
        ):
            raise ConfigError(
                f"link bandwidth must be > 0 bytes/s (or null for infinite), got {self.bandwidth!r}"
            )
        if not _is_number(self.latency) or not (0 <= self.latency < math.inf):
            raise ConfigError(f"link latency must be a finite number >= 0, got {self.latency!r}")
        if not _is_number(self.overhead) or not (0 <= self.overhead < math.inf):
            raise ConfigError(
                f"message overhead must be a finite number >= 0, got {self.overhead!r}"
            )

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def comm_time(self, stage: int) -> float:
        """Seconds for one micro-batch message between ``stage`` and ``stage + 1``."""
        size = self.stages[stage].output_bytes
        transfer = 0.0 if self.bandwidth is None else size / self.bandwidth
        return self.latency + transfer

    def input_bytes_of(self, stage: int) -> int:
        """Bytes of one micro-batch of input to ``stage``."""
        return self.input_bytes if stage == 0 else self.stages[stage - 1].output_bytes

    def messages_per_microbatch(self, stage: int) -> int:
        """Messages a forward (or a backward) of one micro-batch at ``stage`` sends or receives."""
        return int(stage > 0) + int(stage < self.num_stages - 1)

    def to_costs(self) -> Costs:
        """The time part, as the schedule package's :class:`Costs`.

        The message overhead is folded into the forward and backward times:
        a forward at stage s receives from s-1 and sends to s+1, a backward
        the other way, one message each per micro-batch.
        """
        extra = [self.overhead * self.messages_per_microbatch(s) for s in range(self.num_stages)]
        return Costs(
            forward=tuple(float(c.forward_time) + e for c, e in zip(self.stages, extra)),
            backward=tuple(float(c.backward_time) + e for c, e in zip(self.stages, extra)),
            update=tuple(float(c.update_time) for c in self.stages),
            comm=tuple(self.comm_time(s) for s in range(self.num_stages - 1)),
            name=str(self.meta.get("name", "cost model")),
        )

    @classmethod
    def uniform(
        cls,
        num_stages: int,
        forward_time: float = 1.0,
        backward_time: float = 2.0,
        comm_time: float = 0.0,
        *,
        update_time: float = 0.0,
        overhead: float = 0.0,
        weight_bytes: int = 0,
        optimizer_state_bytes: int = 0,
        saved_activation_bytes: int = 0,
        output_bytes: int = 0,
    ) -> CostModel:
        """Every stage the same; ``comm_time`` is the per-message latency (infinite bandwidth)."""
        if not isinstance(num_stages, int) or num_stages < 1:
            raise ConfigError(f"the number of stages must be an integer >= 1, got {num_stages!r}")
        stage = StageCost(
            forward_time=forward_time,
            backward_time=backward_time,
            update_time=update_time,
            output_bytes=output_bytes,
            weight_bytes=weight_bytes,
            optimizer_state_bytes=optimizer_state_bytes,
            saved_activation_bytes=saved_activation_bytes,
        )
        stages = [stage] * num_stages
        # the last stage sends nothing forward
        stages[-1] = replace(stage, output_bytes=0)
        return cls(
            stages=tuple(stages),
            input_bytes=output_bytes,
            latency=comm_time,
            overhead=overhead,
            meta={"name": "uniform"},
        )

    # -- file format ---------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "input_bytes": self.input_bytes,
            "link": {
                "bandwidth": self.bandwidth,
                "latency": self.latency,
                "overhead": self.overhead,
            },
            "stages": [
                {f.name: getattr(c, f.name) for f in fields(StageCost)} for c in self.stages
            ],
            "meta": dict(self.meta),
        }

    @classmethod
    def from_json(cls, data: Any, *, source: str = "cost model") -> CostModel:
        """Read the JSON form; every problem is a :class:`ConfigError` naming ``source``."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("format", FORMAT_NAME) != FORMAT_NAME:
            raise ConfigError(
                f"{source}: format is {data.get('format')!r}, expected {FORMAT_NAME!r}"
            )
        version = data.get("version")
        if version != FORMAT_VERSION:
            raise ConfigError(
                f"{source}: cost file version {version!r} is not supported "
                f"(this timeprest reads version {FORMAT_VERSION})"
            )
        unknown = set(data) - {"format", "version", "input_bytes", "link", "stages", "meta"}
        if unknown:
            raise ConfigError(f"{source}: unknown keys {sorted(unknown)}")
        raw_stages = data.get("stages")
        if not isinstance(raw_stages, list) or not raw_stages:
            raise ConfigError(f"{source}: 'stages' must be a non-empty list of stage objects")
        names = {f.name for f in fields(StageCost)}
        stages: list[StageCost] = []
        try:
            for s, raw in enumerate(raw_stages):
                if not isinstance(raw, dict):
                    raise ConfigError(f"stage {s} is not an object")
                extra = set(raw) - names
                if extra:
                    raise ConfigError(f"stage {s}: unknown keys {sorted(extra)}")
                for need in ("forward_time", "backward_time"):
                    if need not in raw:
                        raise ConfigError(f"stage {s}: missing {need!r}")
                try:
                    stages.append(StageCost(**raw))
                except ConfigError as exc:
                    raise ConfigError(f"stage {s}: {exc}") from None
            link = data.get("link", {})
            if not isinstance(link, dict) or set(link) - {"bandwidth", "latency", "overhead"}:
                raise ConfigError(
                    "'link' must be an object with 'bandwidth', 'latency' and 'overhead'"
                )
            meta = data.get("meta", {})
            if not isinstance(meta, dict):
                raise ConfigError("'meta' must be an object")
            return cls(
                stages=tuple(stages),
                input_bytes=data.get("input_bytes", 0),
                bandwidth=link.get("bandwidth"),
                latency=link.get("latency", 0.0),
                overhead=link.get("overhead", 0.0),
                meta=meta,
            )
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CostModel:
        p = Path(path)
        try:
            text = p.read_text()
        except FileNotFoundError:
            raise ConfigError(f"cost file {str(p)!r} does not exist") from None
        except UnicodeDecodeError:
            raise ConfigError(f"cost file {str(p)!r} is not UTF-8 text (not JSON)") from None
        except OSError as exc:
            raise ConfigError(f"cannot read cost file {str(p)!r}: {exc.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"cost file {str(p)!r} is not valid JSON: {exc.msg} at line {exc.lineno}"
            ) from None
        return cls.from_json(data, source=f"cost file {str(p)!r}")


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def uniform_or_file(
    num_stages: int,
    path: str | os.PathLike[str] | None,
    forward_time: float,
    backward_time: float,
    comm_time: float,
    *,
    update_time: float = 0.0,
    overhead: float = 0.0,
    **sizes: int,
) -> CostModel:
    """The cost model the CLI uses: a file (which must match ``num_stages``) or uniform costs."""
    if path is None:
        return CostModel.uniform(
            num_stages,
            forward_time,
            backward_time,
            comm_time,
            update_time=update_time,
            overhead=overhead,
            **sizes,
        )
    model = CostModel.load(path)
    if model.num_stages != num_stages:
        raise ConfigError(
            f"cost file {str(path)!r} describes {model.num_stages} stages but --stages is "
            f"{num_stages}: profile with --stages {num_stages} or pass --stages {model.num_stages}"
        )
    return model


def stage_costs(
    forward: Sequence[float], backward: Sequence[float], **per_stage: Sequence[int | float]
) -> tuple[StageCost, ...]:
    """Build per-stage costs from parallel lists (handy in tests and notebooks)."""
    w = len(forward)
    if len(backward) != w or any(len(v) != w for v in per_stage.values()):
        raise ConfigError(f"every per-stage list needs {w} entries")
    return tuple(
        StageCost(
            forward_time=forward[s],
            backward_time=backward[s],
            **{k: v[s] for k, v in per_stage.items()},  # type: ignore[arg-type]
        )
        for s in range(w)
    )
