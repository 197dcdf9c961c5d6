"""The flags every command shares, built from :class:`~timeprest.train.TrainConfig`'s fields.

One home for defaults: a flag's name, type, help and default come from its
field, and every command resolves (method, W, N, overrides) through
:func:`timeprest.policy.resolve`. So ``timeprest schedule``, ``simulate``,
``profile``, ``train`` and ``compare`` give the same N and the same method for
the same flags.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from timeprest.errors import ConfigError
from timeprest.policy import Resolved, method_names, resolve
from timeprest.train import TrainConfig, load_config_file
from timeprest.train.config import POLICY_OVERRIDES

# the pipeline's shape and rules: what every command that builds a schedule takes
PIPELINE_FLAGS = ("method", "stages", "microbatches")
POLICY_FLAGS = POLICY_OVERRIDES
COSTS_FLAG = ("costs",)

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_DEFAULTS = TrainConfig()


def _bool(text: str) -> bool:
    v = text.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _kind(name: str) -> Any:
    base = str(_FIELDS[name].type).split(" | ")[0]
    return {"int": int, "float": float, "bool": _bool}.get(base)


def _help(name: str) -> str:
    meta = _FIELDS[name].metadata
    text = str(meta["help"])
    choices: Sequence[str] = meta["choices"] or (method_names() if name == "method" else ())
    if choices:
        text += f"; one of {', '.join(choices)}"
    default = getattr(_DEFAULTS, name)
    if default is not None and "(default" not in text:
        text += f" (default {default})"
    return text


class _JoinValues(argparse.Action):
    """A repeatable flag whose values are joined with commas (``--model-opt a=1 --model-opt b=2``)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        old = getattr(namespace, self.dest, None)
        joined = str(values) if not isinstance(old, str) else f"{old},{values}"
        setattr(namespace, self.dest, joined)


def add_field_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    names: Iterable[str],
    *,
    suppress: bool,
) -> None:
    """A ``--flag`` per TrainConfig field in ``names``.

    ``suppress``: an unset flag leaves no attribute (so a config file can supply
    it, see :func:`config_from_args`); otherwise its default is the field's.
    """
    for name in names:
        kwargs: dict[str, Any] = {
            "dest": name,
            "default": argparse.SUPPRESS if suppress else getattr(_DEFAULTS, name),
            "help": _help(name),
        }
        kind = _kind(name)
        if kind is not None:
            kwargs["type"] = kind
        if _FIELDS[name].metadata.get("repeat"):
            kwargs["action"] = _JoinValues
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def add_pipeline_flags(
    parser: argparse.ArgumentParser,
    *,
    policy: bool = True,
    costs: bool = True,
) -> None:
    """--method, --stages, --microbatches; the policy overrides; the cost mode."""
    group = parser.add_argument_group("pipeline")
    names = [*PIPELINE_FLAGS, *(POLICY_FLAGS if policy else ()), *(COSTS_FLAG if costs else ())]
    add_field_flags(group, names, suppress=False)


def resolve_args(args: argparse.Namespace, *, warn: bool = True) -> Resolved:
    """The checked (method, schedule, policy, W, N) of a command's pipeline flags."""
    n = args.microbatches
    if n is not None and n < 1:  # named by its flag here: resolve() names the argument
        raise ConfigError(f"--microbatches: the number of micro-batches must be >= 1, got {n}")
    overrides: dict[str, Any] = {name: getattr(args, name, None) for name in POLICY_OVERRIDES}
    return resolve(args.method, args.stages, n, warn=warn, **overrides)


def add_training_flags(p: argparse.ArgumentParser, *, with_method: bool = True) -> None:
    """Every TrainConfig flag, grouped as the fields are (``train`` and ``compare``)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f in _FIELDS.items():
        if not f.metadata["flag"] or (name == "method" and not with_method):
            continue
        group = groups.get(f.metadata["group"])
        if group is None:
            group = groups[f.metadata["group"]] = p.add_argument_group(f.metadata["group"])
        add_field_flags(group, [name], suppress=True)
    groups["execution"].add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=argparse.SUPPRESS,
        help="no progress bar",
    )
    p.add_argument("--config", default=None, help="TOML (or .json) file of settings; flags win")


def config_from_args(args: argparse.Namespace, **forced: Any) -> TrainConfig:
    """TrainConfig defaults, then the --config file, then the flags given."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    for k, v in vars(args).items():
        if k in _FIELDS:
            values[k] = v
    values.update(forced)
    return TrainConfig(**values)
