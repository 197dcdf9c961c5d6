"""Simulator runs shared by the tests of timeprest.sim (no tensors)."""

from __future__ import annotations

import warnings

from timeprest.sim import CostModel, SimResult, simulate


def sim(
    method: str, w: int, n: int | None = None, t: int = 12, cm: CostModel | None = None
) -> SimResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nF1B with N < W-1 warns; not what these tests are about
        return simulate(method, w, n, t, cm)


def sized(w: int, **kw: float) -> CostModel:
    """Uniform unit costs with distinct sizes, so each memory component is recognisable."""
    return CostModel.uniform(
        w,
        kw.get("forward", 1.0),
        kw.get("backward", 2.0),
        kw.get("comm", 0.0),
        weight_bytes=1000,
        optimizer_state_bytes=100000,
        saved_activation_bytes=10,
        output_bytes=1,
    )
