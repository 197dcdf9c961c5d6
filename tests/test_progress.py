"""The epoch progress display: sparse plain lines off a terminal, nothing when disabled."""

from __future__ import annotations

from timeprest.train.progress import EpochProgress


def test_plain_lines_at_each_quarter_when_not_a_terminal(capsys):
    p = EpochProgress(1, 3, 8, 32, enabled=True)
    for t in range(8):
        p.update(t, 2.0)
    p.close()
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(":")[1].split(",")[0].strip() for ln in lines] == [
        "2/8 mini-batches",
        "4/8 mini-batches",
        "6/8 mini-batches",
        "8/8 mini-batches",
    ]
    assert all(ln.startswith("epoch 2/3: ") and "loss 2.0000" in ln for ln in lines)


def test_disabled_prints_nothing_but_still_smooths_the_loss(capsys):
    p = EpochProgress(0, 1, 2, 32, enabled=False)
    p.update(0, 1.0)
    p.update(1, 2.0)
    p.close()
    assert capsys.readouterr().err == ""
    assert p.done == 2 and abs(p.loss - 1.1) < 1e-12
