"""Export: a run's stages back into one state_dict of the unsplit model, keyed as the user's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import timeprest
from helpers import SMALL_RUN, run_cli
from helpers import assert_one_line_error as one_line_error
from splitting_models import Chain, Hooked, Mixed, run_stages, seq_model
from timeprest.data import load_dataset
from timeprest.errors import ConfigError
from timeprest.export import (
    export_state_dict,
    merge_stage_state_dicts,
    save_state_dict,
)
from timeprest.models import build_model
from timeprest.splitting import apply_plan, plan_split

DATASET = "synthetic:train=256,test=128"


def fresh_mlp(seed: int) -> nn.Module:
    """The model the small run trains, initialised from another seed than the run's."""
    data = load_dataset(DATASET)
    torch.manual_seed(seed)
    return build_model(
        "mlp",
        in_channels=data.in_channels,
        num_classes=data.num_classes,
        image_size=data.image_size,
    ).eval()


def checkpoint_stages(run: Path) -> list[nn.Module]:
    """The run's stages as training left them: a model cut by split.json, loaded from stage{s}.pt."""
    model = fresh_mlp(seed=123)
    counts = json.loads((run / "split.json").read_text())["layer_counts"]
    stages = apply_plan(model, plan_split(model, len(counts), counts))
    for s, stage in enumerate(stages):
        state = torch.load(run / "checkpoint" / f"stage{s}.pt", weights_only=True)
        stage.load_state_dict(state["module"])
    return stages


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("export") / "run"
    rc, _, err = run_cli("train", *SMALL_RUN, "--epochs", "1", "--run-dir", str(run_dir))
    assert rc == 0, err
    return run_dir


def inputs() -> Tensor:
    return torch.randn(16, *load_dataset(DATASET).train.x.shape[1:])


# ---------------------------------------------------------------- from a run directory


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_cli_round_trip(run: Path, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"model.{fmt}"
    rc, stdout, err = run_cli("export", str(run), "--out", str(out))
    assert rc == 0, err
    assert stdout.startswith(f"wrote {out}: 6 tensors")
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left behind
    if fmt == "pt":
        sd = torch.load(out, weights_only=True)
    else:
        import safetensors.torch

        sd = safetensors.torch.load_file(out)
    model = fresh_mlp(seed=7)
    before = model(x := inputs())
    # the user's keys (torch.save keeps the model's order; safetensors sorts them)
    assert (list(sd) if fmt == "pt" else sorted(sd)) == (
        list(model.state_dict()) if fmt == "pt" else sorted(model.state_dict())
    )
    model.load_state_dict(sd, strict=True)
    trained = run_stages(checkpoint_stages(run), x)
    assert torch.equal(model(x), trained) and not torch.equal(before, trained)


def test_export_state_dict_from_the_run_or_its_checkpoint(run: Path) -> None:
    sd = export_state_dict(run)
    assert all(t.device.type == "cpu" for t in sd.values())
    again = export_state_dict(run / "checkpoint")
    assert list(sd) == list(again) and all(torch.equal(sd[k], again[k]) for k in sd)
    stages = checkpoint_stages(run)
    assert torch.equal(sd["fc1.weight"], stages[0].state_dict()["fc1.weight"])


def test_format_flag_and_overwrite(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.bin"
    assert run_cli("export", str(run), "--out", str(out), "--format", "safetensors")[0] == 0
    import safetensors.torch

    assert set(safetensors.torch.load_file(out)) == set(fresh_mlp(0).state_dict())
    rc, _, err = run_cli("export", str(run), "--out", str(out))
    one_line_error(rc, err, "export", "already exists; pass --overwrite")
    assert run_cli("export", str(run), "--out", str(out), "--overwrite")[0] == 0
    assert set(torch.load(out, weights_only=True)) == set(fresh_mlp(0).state_dict())


def test_run_directory_errors(run: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "m.pt")
    rc, _, err = run_cli("export", str(tmp_path / "nowhere"), "--out", out)
    one_line_error(rc, err, "export", "no run directory at")
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run_cli("export", str(empty), "--out", out)
    one_line_error(rc, err, "export", "holds no checkpoint (checkpoint/manifest.json is missing)")
    rc, _, err = run_cli("export", str(run), "--out", str(tmp_path))
    one_line_error(rc, err, "export", "is a directory")

    copy = tmp_path / "copy"
    (copy / "checkpoint").mkdir(parents=True)
    for f in (run / "checkpoint").iterdir():
        (copy / "checkpoint" / f.name).write_bytes(f.read_bytes())
    rc, _, err = run_cli("export", str(copy), "--out", out)
    one_line_error(rc, err, "export", "split.json is missing")

    split = json.loads((run / "split.json").read_text())
    (copy / "split.json").write_text(json.dumps({**split, "layer_paths": []}))
    rc, _, err = run_cli("export", str(copy), "--out", out)
    one_line_error(rc, err, "export", "does not record where its layers sit in the model")
    (copy / "split.json").write_text(json.dumps({**split, "layer_counts": [6]}))
    rc, _, err = run_cli("export", str(copy), "--out", out)
    one_line_error(rc, err, "export", "has 2 stages but")

    (copy / "split.json").write_text(json.dumps(split))
    stage1 = copy / "checkpoint" / "stage1.pt"
    state = torch.load(stage1, weights_only=True)
    torch.save({**state, "minibatches_done": state["minibatches_done"] - 1}, stage1)
    rc, _, err = run_cli("export", str(copy), "--out", out)
    one_line_error(rc, err, "export", "cut off while being written")
    stage1.unlink()
    rc, _, err = run_cli("export", str(copy), "--out", out)
    one_line_error(rc, err, "export", "has no stage1.pt")
    assert not Path(out).exists()


def test_safetensors_missing_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ConfigError, match="needs the safetensors package: pip install safetensors"):
        save_state_dict({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    with pytest.raises(ConfigError, match="format must be one of pt, safetensors, got 'onnx'"):
        save_state_dict({"w": torch.ones(2)}, tmp_path / "m.pt", format="onnx")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_safetensors_takes_tied_and_strided_tensors(tmp_path: Path) -> None:
    import safetensors.torch

    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.Tanh(), shared)  # one module, two keys, one storage
    state = {**model.state_dict(), "t": torch.randn(3, 4).t()}
    path = save_state_dict(state, tmp_path / "m.safetensors")
    back = safetensors.torch.load_file(path)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


# ---------------------------------------------------------------- from stages in memory


def test_pipeline_stages_merge_into_a_fresh_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    plan = plan_split(model, 2)
    pipe = timeprest.Pipeline(
        apply_plan(model, plan),
        method="i-timeprest",
        num_microbatches=2,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        loss_fn=nn.functional.mse_loss,
    )
    batches = [(torch.randn(8, 4), torch.randn(8, 2)) for _ in range(4)]
    pipe.train(batches)
    sd = merge_stage_state_dicts(plan, [s.state_dict() for s in pipe.stages])
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    fresh.load_state_dict(sd, strict=True)
    x = torch.randn(5, 4)
    assert torch.equal(fresh(x), run_stages(pipe.stages, x))

    # the same through a checkpoint and split.json, as a run directory holds them
    pipe.save_checkpoint(tmp_path / "checkpoint")
    (tmp_path / "split.json").write_text(json.dumps(plan.to_dict()))
    from_run = export_state_dict(tmp_path)
    assert list(from_run) == list(sd) and all(torch.equal(from_run[k], sd[k]) for k in sd)


@pytest.mark.parametrize(
    "make, shape",
    [(seq_model, (3, 1, 8, 8)), (Chain, (3, 6)), (Mixed, (3, 2, 8, 8)), (Hooked, (3, 4))],
    ids=["sequential", "traced-chain", "traced-segments", "hook"],
)
def test_every_way_of_finding_layers_maps_back(make: type[nn.Module], shape: tuple[int]) -> None:
    model = make().eval()
    layers = plan_split(model, 1).layer_counts[0]
    plan = plan_split(model, min(3, layers))
    stages = apply_plan(model, plan)
    for stage in stages:  # new weights, so a fresh model matches only if every key arrives
        for p in stage.parameters():
            p.data.add_(torch.randn_like(p))
    sd = merge_stage_state_dicts(plan.to_dict(), [s.state_dict() for s in stages])
    torch.manual_seed(99)
    fresh = make().eval()
    fresh.load_state_dict(sd, strict=True)
    x = torch.randn(shape)
    assert torch.equal(fresh(x), run_stages(stages, x))


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet18"])
def test_zoo_models_map_back(name: str) -> None:
    model = build_model(name, in_channels=3, num_classes=10, image_size=32)
    plan = plan_split(model, 4)
    stages = apply_plan(model, plan)
    sd = merge_stage_state_dicts(plan, [s.state_dict(keep_vars=True) for s in stages])
    expected = model.state_dict(keep_vars=True)  # the tensors themselves: each lands at its key
    assert list(sd) == list(expected) and all(sd[k] is expected[k] for k in sd)


def test_what_cannot_map_back_is_refused() -> None:
    class Wrapping(Hooked):
        def pipeline_layers(self) -> list[nn.Module]:
            return [nn.Sequential(self.a), self.b]

    model = Wrapping()
    plan = plan_split(model, 2)
    states = [s.state_dict() for s in apply_plan(model, plan)]
    with pytest.raises(ConfigError, match="layer '0' of stage 0 is not a module of the model"):
        merge_stage_state_dicts(plan, states)

    model2 = seq_model()
    plan2 = plan_split(model2, 2)
    states2 = [s.state_dict() for s in apply_plan(model2, plan2)]
    with pytest.raises(ConfigError, match="the split has 2 stages but 1 stage state dicts"):
        merge_stage_state_dicts(plan2, states2[:1])
    with pytest.raises(ConfigError, match="belongs to none of its layers"):
        merge_stage_state_dicts(plan2, states2[::-1])
    with pytest.raises(ConfigError, match="missing 8.weight, 8.bias"):
        merge_stage_state_dicts(
            plan2, [states2[0], {k: v for k, v in states2[1].items() if not k.startswith("8.")}]
        )
