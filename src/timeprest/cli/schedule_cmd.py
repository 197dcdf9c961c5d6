"""``timeprest schedule``: print the per-stage programs of a method as a grid or JSON."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from timeprest.policy import get_method, method_names, resolve_policy, warn_multiple_sequence
from timeprest.schedule import COST_MODES, build_schedule, grid_cells


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "schedule",
        help="print a method's schedule (stage x time grid, or JSON)",
        description="Print the per-stage programs of a method under default or paper costs.",
    )
    p.add_argument("--method", required=True, help=f"one of: {', '.join(method_names())}")
    p.add_argument("--stages", type=int, required=True, help="number of stages W")
    p.add_argument("--microbatches", type=int, default=None, help="micro-batches per mini-batch N")
    p.add_argument("--minibatches", type=int, default=4, help="number of mini-batches T")
    p.add_argument("--schedule", default=None, help="override the method's schedule kind")
    p.add_argument("--costs", default="default", choices=COST_MODES)
    p.add_argument("--format", default="grid", choices=("grid", "json"))
    p.add_argument("--verbose", action="store_true", help="print the full error text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    m = get_method(args.method)
    kind, _policy = resolve_policy(args.method, schedule=args.schedule)
    n = args.microbatches if args.microbatches is not None else (m.default_microbatches or 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_multiple_sequence(m.name, kind, args.stages, n)
        sched = build_schedule(kind, args.stages, n, args.minibatches, args.costs, warn=False)
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
