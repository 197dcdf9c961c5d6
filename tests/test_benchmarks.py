"""The benchmarks' own logic: the reading against issue 11's targets and the plain references."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # the scripts import their shared _grid
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def point(width: int, n: int, fb: float, **methods: dict[str, float]) -> dict:
    stage = {"F": fb / 2, "B": fb / 2}
    return {"width": width, "rows": 32, "n": n, "stages": [stage, stage], "methods": methods}


def cell(vs: float, steady: float, own_steady: float, of_bound: float, of_own: float) -> dict:
    return {
        "vs_1f1b": vs,
        "steady_of_bound": steady,
        "steady_of_own": own_steady,
        "of_bound": of_bound,
        "of_own_bound": of_own,
        "work_of_fbu": 1.0,
        "work_of_own": 1.2,
        "pred_steady": 1.0,
    }


def test_targets_count_each_target_over_the_cells_it_applies_to():
    throughput = load("throughput")
    results = [
        # F + B 1 ms: the bound and work targets do not apply; N = 2: the bubble is 1/3
        point(256, 2, 1e-3, **{"v-timeprest": cell(1.05, 0.5, 0.5, 0.5, 0.5)}),
        point(
            1024,
            4,
            8e-3,
            **{
                "v-timeprest": cell(1.3, 0.96, 0.99, 0.8, 0.9),
                "pipedream": cell(0.97, 0.90, 1.0, 0.8, 0.8),
                # synchronous: only the simulator's targets (the run's read where measured)
                "gpipe": {"pred_steady": 1.3, "run_pred_steady": 1.1},
                "torch-1F1B": {"vs_1f1b": 1.0},
            },
        ),
    ]
    lines = throughput.targets(results)
    text = "\n".join(lines)
    assert "never below Schedule1F1B: 2 of 3" in text
    assert "pipedream at 1024/32/4 0.97" in text
    assert "where its bubble >= 1/3: 0 of 1" in text  # 1.05 < 1.1 at the N = 2 point
    assert ">= 0.95 of the F + B bound (steady): 1 of 2" in text
    assert "own / bound >= 0.95 (reachable): 1 of 2" in text  # 0.8 / 0.9 < 0.95; 1.0
    assert "work <= 1.05x the concurrent F + B + U: 2 of 2" in text
    assert "  the same against the own arithmetic: 0 of 2" in lines
    assert "simulator within 15 % (sim / steady): 3 of 4" in text
    assert "gpipe at 1024/32/4 1.30" in text
    # a grid saved before the run's prediction has none for the other cells: 1 of 1
    assert "  the same from the runtime's own action times (run / steady): 1 of 1" in lines


def test_the_ordered_reference_runs_the_emulator_order_and_the_plain_numbers():
    overhead = load("engine_overhead")
    order = overhead.emulator_order("1f1b", 2, 2, 1)
    text = [f"{k}{s}.{t}" + ("" if j is None else f".{j}") for k, s, t, j in order]
    assert text == ["F0.0.0", "F0.0.1", "F1.0.0", "B1.0.0", "F1.0.1", "B1.0.1", "U1.0"] + [
        "B0.0.0",
        "B0.0.1",
        "U0.0",
    ]
    torch.manual_seed(0)
    stages = [torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()) for _ in range(2)]
    batches = [(torch.randn(4, 8), torch.randn(4, 8)) for _ in range(2)]
    plain = overhead.Plain(stages, 2)
    ordered = overhead.PlainOrdered(stages, 2, "1f1b", 2)
    staged = overhead.PlainStages(stages, 2)
    for run in (plain, ordered, staged):
        run(batches)
    want = list(plain.model.parameters())
    for run in (ordered, staged):
        got = [p for ps in run.params for p in ps]
        assert all(torch.equal(a, b) for a, b in zip(want, got))
    # a stale method's order puts updates between a forward and its backward: an in-place
    # step there would make autograd refuse the backward; the out-of-place one trains
    stale = overhead.PlainOrdered(stages, 1, "pipedream", 2)
    before = [p.detach().clone() for ps in stale.params for p in ps]
    stale(batches)
    after = [p for ps in stale.params for p in ps]
    assert all(torch.isfinite(p).all() for p in after)
    assert not any(torch.equal(a, b) for a, b in zip(before, after))
