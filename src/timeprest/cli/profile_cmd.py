"""``timeprest profile``: measure a model's per-stage costs on this machine and write a cost file.

Example::

    timeprest profile --model cnn --dataset fashion-mnist --stages 4 --microbatches 4 \\
        --batch-size 128 --out costs.json
    timeprest simulate --method v-timeprest --stages 4 --microbatches 4 --cost-file costs.json
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

from timeprest.cli.common import add_pipeline_flags, resolve_args
from timeprest.errors import ConfigError
from timeprest.sim.simulate import format_bytes
from timeprest.train.config import parse_balance


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="time each pipeline stage of a model here and write a cost file for `simulate`",
        description=(
            "Split a model into stages, time the forward, backward and optimizer step of one "
            "micro-batch per stage (warm-up, then the median of repeats), measure weight, "
            "optimizer-state, saved-activation and message sizes, and write them as a cost file."
        ),
    )
    p.add_argument("--model", required=True, help="model name: mlp, cnn, resnet18, vgg16, resnet50")
    p.add_argument("--dataset", required=True, help="dataset name, e.g. fashion-mnist, synthetic")
    # the method whose engine path is timed: its schedule, weight versions and update
    add_pipeline_flags(p, policy=False, costs=False)
    p.add_argument("--batch-size", type=int, default=128, help="rows per mini-batch (default 128)")
    p.add_argument(
        "--balance",
        default="time",
        help="time, params, or layer counts per stage such as 3,4,4,3 (default time)",
    )
    p.add_argument(
        "--optimizer",
        default="sgd",
        choices=("sgd", "adam"),
        help="optimizer whose step is timed and whose state is sized (default sgd)",
    )
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument(
        "--layers-only",
        action="store_true",
        help="time a plain autograd forward and backward of the layers instead of the engine",
    )
    p.add_argument("--device", default="cpu", help="device to time on (default cpu)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads to time with (default: this process's, torch's choice; "
        "with --engine distributed: 1 per process, as the runtime runs)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed mini-batches first (default: the number of stages, at least 2)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed mini-batches; the median of their per-mini-batch means is kept (default 5)",
    )
    p.add_argument(
        "--bandwidth",
        type=float,
        default=None,
        help="link bandwidth between stages in bytes/s (default: infinite)",
    )
    p.add_argument(
        "--latency", type=float, default=0.0, help="seconds per message between stages (default 0)"
    )
    p.add_argument(
        "--measure-link",
        action="store_true",
        help="measure latency and bandwidth between two local processes over the runtime's "
        "transport (shared memory where it can run, else gloo on loopback: the link of a "
        "one-machine distributed run) instead of --bandwidth/--latency",
    )
    p.add_argument(
        "--engine",
        default="emulate",
        choices=("emulate", "distributed"),
        help="emulate (default): time the actions in this process, the messages in memory; "
        "distributed: then time them again in a short run of the distributed runtime (one "
        "process per stage, torchrun on loopback) and write those, sends and receives "
        "included, with no per-message overhead (docs/simulator.md)",
    )
    p.add_argument("--data-dir", default=None, help="where the dataset files are")
    p.add_argument("--image-size", type=int, default=None, help="resize images to this size")
    p.add_argument("--seed", type=int, default=0, help="seed for the model's initial weights")
    p.add_argument("--out", required=True, metavar="FILE", help="cost file to write (JSON)")
    p.add_argument("--verbose", action="store_true", help="print the full error text")
    p.set_defaults(func=run)


def front_end() -> tuple[Any, Any, Any]:
    """The model, data and splitting modules (written separately from the simulator)."""
    try:
        models = importlib.import_module("timeprest.models")
        data = importlib.import_module("timeprest.data")
        split = importlib.import_module("timeprest.splitting")
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"`timeprest profile` needs {exc.name}, which this installation lacks; "
            "use timeprest.sim.profile.profile_stages on your own stages instead"
        ) from None
    return models.build_model, data.load_dataset, split


def model_and_sample(
    build_model: Any,
    load_dataset: Any,
    model: str,
    dataset: str,
    data_dir: str | None,
    image_size: int | None,
    seed: int,
    batch_size: int,
) -> tuple[Any, Any, Any]:
    """The model built from ``seed`` for ``dataset`` and the sample mini-batch (the training
    set's first ``batch_size`` rows): what the profile and its distributed workers time."""
    import torch

    ds = load_dataset(dataset, data_dir, image_size=image_size)
    torch.manual_seed(seed)
    net = build_model(
        model, in_channels=ds.in_channels, num_classes=ds.num_classes, image_size=ds.image_size
    )
    return net, ds.train.x[:batch_size], ds.train.y[:batch_size]


def optimizer_factory(name: str, momentum: float) -> Any:
    """``--optimizer``: the optimizer whose step is timed (Adam at 1e-3, else SGD at 0.01)."""
    import torch

    def make_opt(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if name == "adam":
            return torch.optim.Adam(params, lr=1e-3)
        return torch.optim.SGD(params, lr=0.01, momentum=momentum)

    return make_opt


def _distributed_times(args: argparse.Namespace, w: int, n: int, layer_counts: Any) -> Any:
    """Every stage's (F, B, U) from a short run of the distributed runtime: ``w`` torchrun
    workers (:mod:`timeprest.cli.profile_worker`) on the same model, split and sample."""
    import json
    import tempfile
    from pathlib import Path

    from timeprest.engine.launch import launch_local

    warmup = max(2, w) if args.warmup is None else args.warmup
    spec = {
        "model": args.model,
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "image_size": args.image_size,
        "seed": args.seed,
        "stages": w,
        "microbatches": n,
        "method": args.method,
        "batch_size": args.batch_size,
        "layer_counts": list(layer_counts),
        "optimizer": args.optimizer,
        "momentum": args.momentum,
        "warmup": warmup,
        "repeats": args.repeats,
        "timeout": 300.0,
        "threads": 1 if args.threads is None else args.threads,
    }
    with tempfile.TemporaryDirectory(prefix="timeprest-profile-") as tmp:
        spec_path, out = Path(tmp) / "spec.json", Path(tmp) / "times.json"
        spec_path.write_text(json.dumps(spec))
        print(f"timing the actions in {w} processes (torchrun, loopback)", flush=True)
        code = launch_local(w, [str(spec_path), str(out)], module="timeprest.cli.profile_worker")
        if code != 0 or not out.exists():
            raise ConfigError(
                f"the distributed profile failed (torchrun exit code {code}); the workers' "
                "messages above say why"
            )
        return json.loads(out.read_text())["times"]


def run(args: argparse.Namespace) -> int:
    import torch

    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # --threads holds for this command only


def _run(args: argparse.Namespace) -> int:
    import torch

    from timeprest.sim.profile import profile_stages

    resolved = resolve_args(args, warn=False)  # the method's N by default, as everywhere
    w, n = resolved.num_stages, resolved.num_microbatches
    if args.batch_size < n:
        raise ConfigError(
            f"--batch-size {args.batch_size} is smaller than --microbatches {n}: "
            "every micro-batch needs at least one row"
        )
    if args.bandwidth is not None and not (args.bandwidth > 0):
        raise ConfigError(f"--bandwidth must be > 0 bytes/s, got {args.bandwidth}")
    if not (args.latency >= 0):
        raise ConfigError(f"--latency must be >= 0, got {args.latency}")
    if args.measure_link and (args.bandwidth is not None or args.latency != 0.0):
        raise ConfigError("give --measure-link or --bandwidth/--latency, not both")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.engine == "distributed" and args.layers_only:
        raise ConfigError("--layers-only times the layers alone: not with --engine distributed")
    if args.engine == "distributed" and args.device != "cpu":
        raise ConfigError("--engine distributed profiles on the CPU (gloo): drop --device")
    from timeprest.device import check_available

    check_available(args.device)
    if args.model == "gpt":
        raise ConfigError(
            "timeprest profile times the image models on an image dataset: --model gpt is not "
            "supported here"
        )
    balance = parse_balance(args.balance)
    build_model, load_dataset, splitting = front_end()
    if args.engine == "distributed":
        from timeprest.engine.launch import in_distributed_job

        if in_distributed_job():
            raise ConfigError(
                "`timeprest profile --engine distributed` starts its own processes: run it "
                "outside torchrun"
            )

    model, x, y = model_and_sample(
        build_model, load_dataset, args.model, args.dataset, args.data_dir, args.image_size,
        args.seed, args.batch_size,
    )  # fmt: skip
    if x.shape[0] < n:
        raise ConfigError(f"the training set has {x.shape[0]} rows, fewer than {n} micro-batches")
    micro = torch.tensor_split(x, n)[0]
    plan = splitting.plan_split(model, w, balance, sample_input=micro, device=args.device)
    stages = splitting.apply_plan(model, plan)
    make_opt = optimizer_factory(args.optimizer, args.momentum)

    cost_model = profile_stages(
        stages,
        x,
        n,
        sample_target=y,
        loss_fn=torch.nn.functional.cross_entropy,
        optimizer=make_opt,
        device=args.device,
        warmup=args.warmup,
        repeats=args.repeats,
        bandwidth=args.bandwidth,
        latency=args.latency,
        method=None if args.layers_only else args.method,
        meta={
            "name": f"{args.model}/{args.dataset}",
            "model": args.model,
            "dataset": args.dataset,
            "batch_size": int(x.shape[0]),
            "balance": args.balance,
            "optimizer": args.optimizer,
            "threads": torch.get_num_threads(),
        },
    )
    if args.measure_link:
        from dataclasses import replace

        from timeprest.sim.link import measure_link

        sizes = [c.output_bytes for c in cost_model.stages if c.output_bytes > 0]
        if sizes:
            link = measure_link(max(max(sizes), 64))  # the largest activation sent
            cost_model = replace(
                cost_model,
                latency=link.latency,
                bandwidth=link.bandwidth,
                overhead=link.overhead,
                meta={
                    **cost_model.meta,
                    "link": "measured: two local processes, the runtime's transport",
                },
            )
    if args.engine == "distributed":
        from dataclasses import replace

        # the workers build the same model from the seed and cut it the same way
        times = _distributed_times(args, w, n, plan.layer_counts)
        cost_model = replace(
            cost_model,
            overhead=0.0,  # the sends and receives are inside the runtime's action times
            stages=tuple(
                replace(c, forward_time=f, backward_time=b, update_time=u)
                for c, (f, b, u) in zip(cost_model.stages, times)
            ),
            meta={
                **cost_model.meta,
                "timed": f"distributed runtime, method {args.method}",
                "threads": 1 if args.threads is None else args.threads,  # per process
                "emulator_times": [
                    [c.forward_time, c.backward_time, c.update_time] for c in cost_model.stages
                ],
                "emulator_threads": cost_model.meta["threads"],
            },
        )
    try:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # as train and export do
        cost_model.save(args.out)
    except OSError as exc:
        raise ConfigError(f"cannot write {args.out!r}: {exc.strerror}") from None
    print(
        f"{args.model} on {args.dataset}: W={w}, N={n}, batch {x.shape[0]} "
        f"({cost_model.meta['microbatch_rows']} rows per micro-batch), device {args.device}, "
        f"timed: {cost_model.meta['timed']}"
    )
    print(
        f"{'stage':>5} {'forward s':>11} {'backward s':>11} {'update s':>10} "
        f"{'weights':>11} {'activations':>11} {'sent':>11}"
    )
    for s, c in enumerate(cost_model.stages):
        print(
            f"{s:>5} {c.forward_time:>11.4g} {c.backward_time:>11.4g} {c.update_time:>10.4g} "
            f"{format_bytes(c.weight_bytes):>11} {format_bytes(c.saved_activation_bytes):>11} "
            f"{format_bytes(c.output_bytes):>11}"
        )
    bw = "infinite" if cost_model.bandwidth is None else f"{cost_model.bandwidth / 1e9:.3g} GB/s"
    print(
        f"link: latency {cost_model.latency * 1e3:.3g} ms, bandwidth {bw}, "
        f"overhead {cost_model.overhead * 1e3:.3g} ms per message"
    )
    print(f"cost file: {args.out}")
    return 0
