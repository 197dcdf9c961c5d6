"""``timeprest export``: the trained model of a run as one ``state_dict`` of the unsplit model.

Examples::

    timeprest export runs/i-timeprest-cnn-fashion-mnist-W4-s0 --out model.pt
    timeprest export runs/my-run --out model.safetensors          # format from the suffix
    timeprest export runs/my-run/checkpoint --out m.bin --format safetensors --overwrite

The keys are those of the model's own ``state_dict()``, so
``model.load_state_dict(torch.load("model.pt"))`` loads it into a fresh model.
"""

from __future__ import annotations

import argparse

from timeprest.export import FORMATS, export_run


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a run's trained model as one state_dict of the unsplit model (.pt, safetensors)",
        description=(
            "Merge the stages of a run's latest checkpoint into one state_dict keyed as the "
            "unsplit model's own (model.state_dict()), and write it with torch.save or as "
            "safetensors (pip install safetensors)."
        ),
    )
    p.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a run directory of timeprest train (or its checkpoint/ directory)",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="file format (default: safetensors for a .safetensors file, else pt)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path, state = export_run(args.run_dir, args.out, format=args.format, overwrite=args.overwrite)
    values = sum(t.numel() for t in state.values())
    print(f"wrote {path}: {len(state)} tensors, {values:,} values, keys as the model's state_dict")
    return 0
