"""Train several methods on the same data, split, seed and settings, and tabulate them.

``compare(base_cfg, ["pipedream", "v-timeprest", "i-timeprest@0.5"], out_dir)``
runs :func:`timeprest.train.run_training` once per method, one after another,
each in ``out_dir/<method>``, then writes ``out_dir/results.md`` (a markdown
table and the figures of :mod:`timeprest.plots` in ``out_dir/plots``) and
``out_dir/results.json`` (the same rows, for scripts).

Rules that keep the comparison fair and repeatable:

- Every method gets ``base_cfg`` with only ``method`` (and λ, from
  ``i-timeprest@0.5``) changed: same data, seed, batch, optimizer, epochs.
- Micro-batches: without ``--microbatches`` each method takes its own
  default, which is N = W for all but ``pipedream``, whose design is whole
  mini-batches (N = 1, docs/design.md section 6). An explicit ``--microbatches``
  applies to every method, pipedream included.
- The stage split is the same for all: ``--balance time`` is measured once
  (on a micro-batch of the default size) and fixed as layer counts, saved in
  ``out_dir/split.json`` so that repeating the command finds the same split.
- A method whose directory already holds a finished run of the same
  configuration (same identity, epochs and test rows) is reused, not
  retrained. Any other content of a directory is refused unless ``resume``
  (continue it; a directory with no run starts fresh) or ``overwrite``
  (retrain everything) is given. All directories are checked before the
  first run starts, so a conflict never surfaces after hours of training.
- A method whose loss diverges (NaN or infinite) is a result, not an error:
  its row says so and the next method runs. Its directory keeps the epochs
  it finished and counts as unfinished for a later call.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from timeprest.errors import ConfigError, NonFiniteLossError
from timeprest.files import read_json, write_json
from timeprest.policy import get_method
from timeprest.train import (
    RUN_IDENTITY,
    EpochRow,
    TrainConfig,
    epochs_to_target,
    read_epochs,
    run_training,
)
from timeprest.train.rundir import check_empty_or_run, read_run_config

DEFAULT_METHODS = ("pipedream", "timeprest", "v-timeprest", "i-timeprest", "gpipe")

# what must match for a finished run to stand in for a new one
REUSE_IDENTITY = (*RUN_IDENTITY, "epochs", "test_limit")

Action = Literal["train", "reuse", "resume"]


@dataclass(frozen=True)
class MethodSpec:
    """One entry of ``--methods``: a method name and an optional λ (``i-timeprest@0.5``)."""

    text: str
    method: str
    decay: float | None = None


def parse_methods(text: str | Sequence[str]) -> list[MethodSpec]:
    """``"pipedream,i-timeprest@0.5"`` -> specs; ConfigError on unknown or repeated entries."""
    items = text.split(",") if isinstance(text, str) else list(text)
    items = [i.strip() for i in items if i.strip()]
    if not items:
        raise ConfigError("--methods is empty: give methods like pipedream,v-timeprest")
    specs = []
    for item in items:
        name, sep, lam = item.partition("@")
        get_method(name)  # unknown names fail here, with the list of valid ones
        decay = None
        if sep:
            try:
                decay = float(lam)
            except ValueError:
                raise ConfigError(
                    f"--methods: bad λ in {item!r}: expected a number, e.g. {name}@0.5"
                ) from None
            if not (decay >= 0 and math.isfinite(decay)):
                raise ConfigError(f"--methods: λ in {item!r} must be a finite number >= 0")
        specs.append(MethodSpec(item, name, decay))
    seen = [s.text for s in specs]
    dup = next((t for t in seen if seen.count(t) > 1), None)
    if dup is not None:
        raise ConfigError(f"--methods lists {dup!r} twice; each run needs its own directory")
    return specs


def method_config(base: TrainConfig, spec: MethodSpec, out_dir: Path) -> TrainConfig:
    """``base`` with the method, its λ and its run directory."""
    changes: dict[str, Any] = {"method": spec.method, "run_dir": str(out_dir / spec.text)}
    if spec.decay is not None:
        backward = base.backward or get_method(spec.method).policy.backward
        if backward != "intermediate":
            raise ConfigError(
                f"--methods {spec.text}: λ only acts on an intermediate backward "
                f"(i-timeprest, or --backward intermediate); {spec.method} uses {backward!r}"
            )
        changes["decay"] = spec.decay
    return dataclasses.replace(base, **changes)


@dataclass
class Outcome:
    """One method's run, as the results table shows it."""

    spec: MethodSpec
    run_dir: Path
    action: Action
    config: TrainConfig
    epochs: list[EpochRow]
    failure: str | None = None
    """Why training stopped early (the loss diverged), else None."""


def compare(
    base: TrainConfig,
    methods: str | Sequence[str],
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    plots: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Run every method (or reuse its finished run); write results.md; return its path."""
    out = Path(out_dir)
    specs = parse_methods(methods)
    cfgs = [method_config(base, s, out) for s in specs]
    for cfg in cfgs:
        cfg.validate()  # every config is checked before anything runs
    split_record = None
    if base.balance == "time":
        counts, split_record = fixed_time_split(base, out, overwrite=overwrite, log=log)
        cfgs = [dataclasses.replace(c, balance=counts) for c in cfgs]
    actions = [plan_action(c, resume=resume, overwrite=overwrite) for c in cfgs]
    if split_record is not None:
        # saved only once no directory conflict stopped the comparison: a refused
        # command must not replace the split that the runs in ``out`` were made with
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "split.json", split_record)

    outcomes = []
    for i, (spec, cfg, action) in enumerate(zip(specs, cfgs, actions), start=1):
        run_dir = Path(str(cfg.run_dir))
        failure: str | None = None
        if action == "reuse":
            log(f"[{i}/{len(specs)}] {spec.text}: reusing the finished run in {run_dir}")
        else:
            log(
                f"[{i}/{len(specs)}] {spec.text}: {'resuming' if action == 'resume' else 'training'}"
            )
            try:
                run_training(cfg, resume=action == "resume", overwrite=overwrite, log=log)
            except NonFiniteLossError as exc:
                # a diverging method is a result of the comparison, not a reason to drop the rest
                failure = str(exc).splitlines()[0]
                log(f"{spec.text} diverged: {failure}")
        outcomes.append(Outcome(spec, run_dir, action, cfg, read_epochs(run_dir), failure))

    plot_files: list[Path] = []
    if plots:
        plot_files = _draw(outcomes, out / "plots", log)
    results = out / "results.md"
    results.write_text(results_markdown(base, outcomes, plot_files, out))
    write_json(out / "results.json", [result_row(o, base.target_accuracy) for o in outcomes])
    log(f"results: {results}")
    return results


def plan_action(cfg: TrainConfig, *, resume: bool, overwrite: bool) -> Action:
    """What to do with this method's directory; ConfigError when its content must be kept."""
    run_dir = Path(str(cfg.run_dir))
    old = read_run_config(run_dir, "--out")
    if old is None:
        check_empty_or_run(run_dir, "--out")
        return "train"  # with resume too: a method not started yet starts fresh
    if overwrite:
        return "train"
    diffs = [k for k in REUSE_IDENTITY if old.get(k) != getattr(cfg, k)]
    if not diffs and _finished(run_dir, cfg.epochs):
        return "reuse"
    identity_diffs = [k for k in RUN_IDENTITY if k in diffs]
    if identity_diffs:
        k = identity_diffs[0]
        raise ConfigError(
            f"{run_dir} already holds a different run ({k}={old.get(k)!r}, now "
            f"{getattr(cfg, k)!r}): pass --overwrite to replace it, or choose another --out"
        )
    if resume:
        return "resume"  # same run, more epochs or unfinished: continue it
    what = (
        f"a run with {diffs[0]}={old.get(diffs[0])!r} (now {getattr(cfg, diffs[0])!r})"
        if diffs
        else "an unfinished run of this configuration"
    )
    raise ConfigError(
        f"{run_dir} already holds {what}: pass --resume to continue it, --overwrite to "
        "replace it, or choose another --out"
    )


def _finished(run_dir: Path, epochs: int) -> bool:
    """summary.json is written last; it and the epoch log must both cover ``epochs``."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return summary.get("epochs") == epochs and len(read_epochs(run_dir)) == epochs


def fixed_time_split(
    base: TrainConfig,
    out: Path,
    *,
    overwrite: bool,
    log: Callable[[str], None],
) -> tuple[str, dict[str, Any] | None]:
    """Layer counts (``"2,4"``) of a time-balanced split, measured once per output directory.

    Timing is noisy: measured again for each method, the split (and with it
    the per-stage memory and the schedule's costs) could differ between
    methods, and between two runs of the same command. ``out/split.json``
    keeps the first measurement for every later call with the same settings.
    Returns the counts and, when they were measured now, the record for the
    caller to save in ``out/split.json``.
    """
    key = {
        k: getattr(base, k)
        for k in ("dataset", "model", "stages", "image_size", "batch_size", "microbatches")
    }
    key.update(device=base.device, seed=base.seed)
    saved = out / "split.json"
    if saved.exists() and not overwrite:
        old = read_json(saved, "delete it or pass --overwrite")
        if old.get("key") == key:
            counts = ",".join(str(c) for c in old["layer_counts"])
            log(f"split: layer counts {counts} (measured earlier, {saved})")
            return counts, None
    counts_list = _measure_split(base)
    counts = ",".join(map(str, counts_list))
    log(f"split: layer counts {counts} (balanced by measured time, kept for every method)")
    return counts, {"key": key, "balance": "time", "layer_counts": counts_list}


def _measure_split(cfg: TrainConfig) -> list[int]:
    """The split run_training would choose for ``cfg`` with ``--balance time``.

    The sample is one micro-batch of the size that the methods without a
    micro-batch default of their own use (N = --microbatches, else W).
    """
    import torch

    from timeprest.tasks import task_for
    from timeprest.train.loop import seeded_model, split_plan

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    train, _, info = task_for(cfg).load()
    model = seeded_model(cfg, info, cfg.device)
    plan = split_plan(cfg, model, train, "time", cfg.microbatches or cfg.stages, cfg.device)
    return list(plan.layer_counts)


def result_row(o: Outcome, target: float | None) -> dict[str, Any]:
    """The figures of one method: final and best accuracy, memory, staleness, time.

    A run that diverged before its first epoch ended has no figures: they are None.
    """
    from timeprest.plots import run_label

    config = _run_config(o.run_dir)
    resolved = config.get("resolved") or {}
    row: dict[str, Any] = {
        "method": o.spec.text,
        "label": run_label(config),
        "run_dir": str(o.run_dir),
        "action": o.action,
        "failure": o.failure,
        "microbatches": resolved.get("num_microbatches", o.config.num_microbatches),
        "decay": resolved.get("decay") if resolved.get("backward") == "intermediate" else None,
        "epochs": len(o.epochs),
        "target_accuracy": target,
    }
    eps = o.epochs
    if not eps:
        for key in _FIGURES:
            row[key] = None
        return row
    best = max(eps, key=lambda e: e.test_accuracy)
    stages = range(eps[-1].num_stages)
    row.update(
        final_test_accuracy=eps[-1].test_accuracy,
        best_test_accuracy=best.test_accuracy,
        best_epoch=best.epoch,
        epochs_to_target=epochs_to_target(eps, target),
        peak_versions=[max(e.peak_versions[s] for e in eps) for s in stages],
        peak_weight_bytes=[max(e.peak_weight_bytes[s] for e in eps) for s in stages],
        # every epoch has the same number of mini-batches: the mean of means is the mean
        mean_staleness=[sum(e.mean_staleness[s] for e in eps) / len(eps) for s in stages],
        mean_epoch_time=sum(e.epoch_time for e in eps) / len(eps),
        final_val_loss=eps[-1].test_loss,
        final_bits_per_byte=eps[-1].test_bits_per_byte,
        best_bits_per_byte=min(
            (e.test_bits_per_byte for e in eps if e.test_bits_per_byte is not None), default=None
        ),
    )
    return row


_FIGURES = (
    "final_test_accuracy",
    "best_test_accuracy",
    "best_epoch",
    "epochs_to_target",
    "peak_versions",
    "peak_weight_bytes",
    "mean_staleness",
    "mean_epoch_time",
    "final_val_loss",
    "final_bits_per_byte",
    "best_bits_per_byte",
)


def _run_config(run_dir: Path) -> dict[str, Any]:
    cfg = read_json(run_dir / "config.json")
    return cfg if isinstance(cfg, dict) else {}


def results_markdown(
    base: TrainConfig, outcomes: list[Outcome], plot_files: list[Path], out: Path
) -> str:
    from timeprest.plots import format_bytes

    target = base.target_accuracy
    split = f"--balance {base.balance}"
    counts = _layer_counts(outcomes[0].run_dir) if outcomes else None
    if counts is not None and counts != base.balance:
        split += f": layers per stage {counts}"
    lines = [
        "# Method comparison",
        "",
        f"{base.model} on {base.dataset}, W={base.stages} stages ({split}), "
        f"batch {base.batch_size}, {base.optimizer} lr {base.lr:g}, {base.epochs} epochs, "
        f"seed {base.seed}, engine {base.engine} on {base.device}.",
        "",
    ]
    lm = any(e.test_bits_per_byte is not None for o in outcomes for e in o.epochs)
    header = ["method", "N", "final acc", "best acc (epoch)"]
    if lm:  # a language model: the held-out figures are bits per byte
        header = ["method", "N", "final val bits/byte", "best val bits/byte"]
    if target is not None:
        header.append(f"epochs to {target * 100:g}%")
    header += [
        "weight versions / stage",
        "peak weight bytes / stage",
        "mean staleness / stage",
        "time / epoch",
        "run",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for o in outcomes:
        r = result_row(o, target)
        run = o.run_dir.relative_to(out) if o.run_dir.is_relative_to(out) else o.run_dir
        cells = [r["label"], str(r["microbatches"])]
        if r["epochs"] == 0:
            cells += ["diverged"] + ["–"] * (len(header) - 4)
        else:
            if lm:
                final = f"{r['final_bits_per_byte']:.4f}"
                best = f"{r['best_bits_per_byte']:.4f}"
            else:
                final = f"{r['final_test_accuracy'] * 100:.2f}%"
                best = f"{r['best_test_accuracy'] * 100:.2f}% ({r['best_epoch']})"
            if o.failure is not None:
                final = f"diverged after epoch {r['epochs']}: {final}"
            cells += [final, best]
            if target is not None:
                e = r["epochs_to_target"]
                cells.append("not reached" if e is None else str(e))
            cells += [
                " / ".join(str(v) for v in r["peak_versions"]),
                " / ".join(format_bytes(b) for b in r["peak_weight_bytes"]),
                " / ".join(f"{d:.2f}" for d in r["mean_staleness"]),
                f"{r['mean_epoch_time']:.2f} s",
            ]
        cells.append(f"`{run}`" + (" (reused)" if o.action == "reuse" else ""))
        lines.append("| " + " | ".join(cells) + " |")
        if o.failure is not None:
            notes.append(f"- {r['label']}: {o.failure}")
    if notes:
        lines += ["", "Training stopped early:", "", *notes]
    lines += [
        "",
        "N: micro-batches per mini-batch. Weight versions and bytes: the peak held at once "
        "during training. Staleness: mean degree d = k − v of the backward (updates between a "
        "micro-batch's forward and its backward), over all epochs. Time per epoch: training "
        "only, evaluation excluded.",
        "",
    ]
    for f in plot_files:
        rel = f.relative_to(out) if f.is_relative_to(out) else f
        lines += [f"![{f.stem}]({rel.as_posix()})", ""]
    return "\n".join(lines)


def _layer_counts(run_dir: Path) -> str | None:
    try:
        split = json.loads((run_dir / "split.json").read_text())
        return ",".join(str(c) for c in split["layer_counts"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None  # the table names the --balance setting only


def _draw(outcomes: list[Outcome], plot_dir: Path, log: Callable[[str], None]) -> list[Path]:
    """The figures; missing matplotlib leaves the table without them rather than losing it."""
    from timeprest.plots import plot_runs

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log("matplotlib is not installed: results.md has no plots (pip install timeprest[plot])")
        return []
    from timeprest.plots import run_label

    drawable = [o for o in outcomes if o.epochs]  # a run that diverged in epoch 1 has none
    if not drawable:
        return []
    labels = [
        run_label(_run_config(o.run_dir)) + (" (diverged)" if o.failure else "") for o in drawable
    ]
    return plot_runs([o.run_dir for o in drawable], plot_dir, labels=labels)
