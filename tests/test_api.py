"""The public API after every submodule is imported: ``timeprest.split`` stays the function."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import torch
from torch import nn

import timeprest

# the README's Python API example model, word for word
README_MODEL = (
    "nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))"
)
# optional dependencies a submodule may need; a missing one skips that module only
OPTIONAL = {"tensorboard", "torchvision", "matplotlib", "PIL", "numpy", "safetensors", "tqdm"}


def import_every_submodule() -> list[str]:
    imported = []
    for info in pkgutil.walk_packages(timeprest.__path__, "timeprest."):
        if info.name == "timeprest.__main__":  # importing it runs the command line
            continue
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in OPTIONAL:
                raise
            continue
        imported.append(info.name)
    return imported


def test_split_is_the_function_after_every_import() -> None:
    imported = import_every_submodule()
    assert {"timeprest.splitting.partition", "timeprest.export", "timeprest.cli"} <= set(imported)
    assert "split" in timeprest.__all__
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert f"model = {README_MODEL}" in readme

    model = eval(README_MODEL, {"nn": nn})
    x = torch.randn(5, 8)
    for _ in range(2):  # the second call is the one that used to find a module
        stages = timeprest.split(model, 2)  # no sample input: the default needs none
        assert len(stages) == 2
        out = x
        for stage in stages:
            out = stage(out)
        assert torch.equal(out, model(x))
    assert timeprest.split is importlib.import_module("timeprest.splitting").split
    assert timeprest.plan_split(model, 2).layer_counts == (2, 3)


def test_the_readme_python_example_runs(tmp_path: Path, monkeypatch) -> None:
    """The README's Python API block, executed as written (in a scratch directory)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert len(scope["losses"]) == 10
    fresh = eval(README_MODEL, {"nn": nn})
    fresh.load_state_dict(torch.load(tmp_path / "model.pt"), strict=True)
    x = torch.randn(3, 8)
    out = x
    for stage in scope["pipe"].stages:
        out = stage(out)
    assert torch.equal(fresh(x), out)
