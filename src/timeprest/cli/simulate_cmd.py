"""``timeprest simulate``: predict time, bubbles, memory and staleness of a method without tensors.

Examples::

    timeprest simulate --method v-timeprest --stages 4 --microbatches 4 --minibatches 16
    timeprest simulate --method pipedream --stages 4 --cost-file costs.json --format json
    timeprest simulate --method i-timeprest --stages 4 --microbatches 4 --minibatches 6 \\
        --weight-bytes 4194304 --activation-bytes 1048576 --png gantt.png --trace trace.json
    timeprest simulate --stages 2 --data-parallel 2 --weight-bytes 4194304 \\
        --dp-bandwidth 1e9 --dp-latency 2e-5
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from timeprest.cli.common import add_field_flags, add_pipeline_flags, resolve_args
from timeprest.errors import ConfigError
from timeprest.sim.costmodel import uniform_or_file
from timeprest.sim.replicas import format_data_parallel, with_data_parallel
from timeprest.sim.simulate import ORDER_COSTS, format_text, simulate
from timeprest.sim.trace import write_chrome_trace


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="predict timeline, bubbles, memory and staleness from a cost model",
        description=(
            "Replay a method's schedule under a cost model (a file from `timeprest profile`, "
            "or uniform per-micro-batch times) and report time per mini-batch, bubbles, "
            "weight versions, peak memory and staleness per stage."
        ),
    )
    # no --costs mode: --order-costs says which costs order the schedule
    add_pipeline_flags(p, costs=False)
    p.add_argument("--minibatches", type=int, default=32, help="mini-batches T (default 32)")
    p.add_argument(
        "--cost-file",
        default=None,
        metavar="FILE",
        help="cost file (JSON, from `timeprest profile`) instead of uniform costs",
    )
    p.add_argument(
        "--forward-time",
        type=float,
        default=None,
        metavar="F",
        help="seconds per micro-batch forward, every stage (default 1)",
    )
    p.add_argument(
        "--backward-time",
        type=float,
        default=None,
        metavar="B",
        help="seconds per micro-batch backward, every stage (default 2)",
    )
    p.add_argument(
        "--comm-time",
        type=float,
        default=None,
        metavar="C",
        help="seconds per message between neighbouring stages (default 0)",
    )
    p.add_argument(
        "--message-overhead",
        type=float,
        default=None,
        metavar="O",
        help="seconds each message costs the stage that sends or receives it (default 0)",
    )
    p.add_argument(
        "--update-time",
        type=float,
        default=None,
        metavar="U",
        help="seconds per optimizer step (default 0)",
    )
    p.add_argument(
        "--weight-bytes", type=int, default=None, help="bytes of one weight version per stage"
    )
    p.add_argument(
        "--optimizer-bytes", type=int, default=None, help="optimizer-state bytes per stage"
    )
    p.add_argument(
        "--activation-bytes",
        type=int,
        default=None,
        help="saved-activation bytes per micro-batch per stage",
    )
    p.add_argument(
        "--message-bytes",
        type=int,
        default=None,
        help="activation bytes sent per micro-batch between stages",
    )
    p.add_argument(
        "--order-costs",
        default="model",
        choices=ORDER_COSTS,
        help="costs that order the list-rule schedules (default: the simulated ones)",
    )
    dp = p.add_argument_group("data parallel (docs/design.md section 10)")
    add_field_flags(dp, ["data_parallel"], suppress=False)
    dp.add_argument(
        "--dp-bandwidth",
        type=float,
        default=None,
        metavar="BYTES/S",
        help="all-reduce link bandwidth (default: the cost file's link, else infinite)",
    )
    dp.add_argument(
        "--dp-latency",
        type=float,
        default=None,
        metavar="S",
        help="all-reduce latency per ring step (default: the cost file's link, else 0)",
    )
    p.add_argument("--format", default="text", choices=("text", "json"))
    p.add_argument(
        "--trace",
        default=None,
        metavar="FILE.json",
        help="also write a Chrome trace (open in ui.perfetto.dev)",
    )
    p.add_argument(
        "--png",
        default=None,
        metavar="FILE.png",
        help="also draw a Gantt chart with a memory panel (needs matplotlib)",
    )
    p.add_argument("--verbose", action="store_true", help="print the full error text")
    p.set_defaults(func=run)


# the uniform cost model's defaults: forward 1 s, backward 2 s, nothing else
UNIFORM_DEFAULTS: dict[str, float] = {
    "forward_time": 1.0,
    "backward_time": 2.0,
    "comm_time": 0.0,
    "message_overhead": 0.0,
    "update_time": 0.0,
    "weight_bytes": 0,
    "optimizer_bytes": 0,
    "activation_bytes": 0,
    "message_bytes": 0,
}


def run(args: argparse.Namespace) -> int:
    given = {k: getattr(args, k) for k in UNIFORM_DEFAULTS if getattr(args, k) is not None}
    if args.cost_file is not None and given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ConfigError(
            f"--cost-file {args.cost_file} gives every cost; drop {flags} or drop --cost-file"
        )
    if args.png:  # before the simulation
        from timeprest.sim.gantt import check_chart_path  # matplotlib only when asked for

        check_chart_path(args.png, "--png ")
    v = {**UNIFORM_DEFAULTS, **given}
    for name, value in v.items():
        if not (value >= 0):  # also NaN
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    for name in ("forward_time", "backward_time"):
        if v[name] == 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got 0")
    r = resolve_args(args, warn=False)  # simulate() warns about what it builds
    cost_model = uniform_or_file(
        r.num_stages,
        args.cost_file,
        v["forward_time"],
        v["backward_time"],
        v["comm_time"],
        update_time=v["update_time"],
        overhead=v["message_overhead"],
        weight_bytes=int(v["weight_bytes"]),
        optimizer_state_bytes=int(v["optimizer_bytes"]),
        saved_activation_bytes=int(v["activation_bytes"]),
        output_bytes=int(v["message_bytes"]),
    )
    cost_model, dp = with_data_parallel(
        cost_model, args.data_parallel, bandwidth=args.dp_bandwidth, latency=args.dp_latency
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = simulate(
            r.method.name,
            r.num_stages,
            r.num_microbatches,
            args.minibatches,
            cost_model,
            schedule=r.schedule,
            policy=r.policy,
            order_costs=args.order_costs,
        )
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if args.png:
        from timeprest.sim.gantt import draw_gantt  # matplotlib only when asked for

        draw_gantt(result, args.png)
    if args.trace:
        try:
            write_chrome_trace(result, args.trace)
        except OSError as exc:
            raise ConfigError(f"cannot write {args.trace!r}: {exc.strerror}") from None
    if args.format == "json":
        out = result.to_json()
        out["data_parallel"] = {
            "replicas": dp.replicas,
            "bandwidth": dp.bandwidth,
            "latency": dp.latency,
            "allreduce_time": list(dp.reduce_times),
            "throughput": dp.throughput(result),
        }
        print(json.dumps(out))
    else:
        print(format_text(result))
        if dp.replicas > 1:
            print(format_data_parallel(result, dp))
        for what, path in (("Gantt chart", args.png), ("Chrome trace", args.trace)):
            if path:
                print(f"{what}: {path}")
    return 0
