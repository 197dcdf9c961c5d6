"""One process of ``timeprest profile --engine distributed`` (started by torchrun).

``python -m timeprest.cli.profile_worker SPEC OUT``: every worker builds the
model of the JSON file ``SPEC`` from its seed, cuts it with the layer counts
the parent chose (so that every process runs the same split), and runs its
stage of a distributed pipeline on the sample mini-batch, repeated, with
:meth:`timeprest.Pipeline.time_actions`. Rank 0 writes every stage's forward,
backward and update seconds to ``OUT`` (JSON). A failure prints one line and
exits 1 (the other ranks stop with it, as in training).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from timeprest.errors import TimeprestError


def run(spec: dict[str, Any], out: str) -> None:
    import torch

    import timeprest
    from timeprest.cli.profile_cmd import front_end, model_and_sample, optimizer_factory
    from timeprest.engine.runtime import RuntimeOptions

    build_model, load_dataset, splitting = front_end()
    model, x, y = model_and_sample(
        build_model, load_dataset, spec["model"], spec["dataset"], spec["data_dir"],
        spec["image_size"], spec["seed"], spec["batch_size"],
    )  # fmt: skip
    w, n = spec["stages"], spec["microbatches"]
    stages = splitting.apply_plan(
        model, splitting.plan_split(model, w, tuple(spec["layer_counts"]))
    )
    make_opt = optimizer_factory(spec["optimizer"], spec["momentum"])

    pipe = timeprest.Pipeline(
        stages,
        method=spec["method"],
        num_microbatches=n,
        optimizer=make_opt,
        loss_fn=torch.nn.functional.cross_entropy,
        engine="distributed",
        runtime=RuntimeOptions(timeout=spec["timeout"], num_threads=spec["threads"]),
    )
    warmup, repeats = spec["warmup"], spec["repeats"]
    times = pipe.time_actions([(x, y)] * (warmup + repeats), skip=warmup)
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"times": times}, f)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec_path, out = args
    with open(spec_path) as f:
        spec = json.load(f)
    try:
        run(spec, out)
    except TimeprestError as exc:
        print(f"timeprest profile (distributed): {exc}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # one line, as the parent's; the other ranks stop with it
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"timeprest profile (distributed): {type(exc).__name__}: {first}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
