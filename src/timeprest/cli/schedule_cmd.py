"""``timeprest schedule``: print the per-stage programs of a method as a grid or JSON."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from timeprest.cli.common import add_pipeline_flags, resolve_args
from timeprest.schedule import build_schedule, grid_cells


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "schedule",
        help="print a method's schedule (stage x time grid, or JSON)",
        description="Print the per-stage programs of a method under default or paper costs.",
    )
    add_pipeline_flags(p)
    p.add_argument("--minibatches", type=int, default=4, help="number of mini-batches T")
    p.add_argument("--format", default="grid", choices=("grid", "json"))
    p.add_argument("--verbose", action="store_true", help="print the full error text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = resolve_args(args)
        sched = build_schedule(
            r.schedule, r.num_stages, r.num_microbatches, args.minibatches, args.costs, warn=False
        )
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if args.format == "json":
        out = {
            "method": args.method,
            "schedule": sched.kind,
            "costs": args.costs,
            "stages": sched.num_stages,
            "microbatches": sched.num_microbatches,
            "minibatches": sched.num_minibatches,
            "programs": sched.to_text(),
            "grid": grid_cells(sched.timeline()),
        }
        print(json.dumps(out))
    else:
        print(
            f"{args.method}: schedule {sched.kind}, W={sched.num_stages}, "
            f"N={sched.num_microbatches}, T={sched.num_minibatches}, costs {args.costs}"
        )
        print(sched.grid())
    return 0
