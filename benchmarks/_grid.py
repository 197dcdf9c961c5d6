"""The benchmark grid of the throughput and engine-overhead scripts (shared by both).

A covering subset of width {256, 512, 1024, 2048} x micro-batch rows
{16, 32, 128, 256} x N {1, 2, 4, 8}: every corner of width x rows, every
value of every axis, and the shape where the asynchronous methods fell
behind torch's ``Schedule1F1B`` (1024 wide, 32 rows, N = 4). The points
span three orders of magnitude of cost per micro-batch, so the length of
each run is chosen from a quick estimate of one micro-batch's F + B: the
small shapes get many micro-batches, the large ones few, and the whole grid
fits in minutes on two cores.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import time
from typing import NamedTuple

import torch
from torch import nn

import timeprest


class Point(NamedTuple):
    width: int
    rows: int
    n: int


GRID: tuple[Point, ...] = (
    Point(256, 16, 8),
    Point(256, 128, 4),
    Point(256, 256, 2),
    Point(512, 32, 2),
    Point(512, 128, 1),
    Point(512, 256, 8),
    Point(1024, 32, 4),
    Point(1024, 128, 8),
    Point(2048, 16, 4),
    Point(2048, 256, 2),
)


def make_stage(width: int, layers: int) -> nn.Module:
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())])


def estimate_fb(width: int, layers: int, rows: int) -> float:
    """Seconds of one stage's forward + backward of one micro-batch, in this process
    (a rough figure, only to size the runs)."""
    m = make_stage(width, layers)
    x = torch.randn(rows, width)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        m(x).sum().backward()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def clamp(x: float, lo: int, hi: int) -> int:
    return int(min(max(round(x), lo), hi))


def minibatches_for(fb: float, n: int, seconds: float = 0.8) -> int:
    """Mini-batches of N micro-batches per timed run: about ``seconds`` of one stage's
    F + B, at least 8 mini-batches (a steady middle of several intervals to measure),
    at most 96 micro-batches unless 8 mini-batches need more."""
    micro = clamp(seconds / fb, 1, 96)
    return max(8, math.ceil(micro / n))


def environment(threads: int) -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
        f"timeprest {timeprest.__version__}, python {platform.python_version()}, "
        f"{os.cpu_count()} cores ({cpu}), {threads} intra-op thread(s) per process, "
        f"load average {os.getloadavg()[0]:.2f}"
    )


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plain(header: list[str], rows: list[list[str]]) -> str:
    """The same table for the terminal, columns padded."""
    cols = [max(len(x) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(r, cols)) for r in [header, *rows])


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
