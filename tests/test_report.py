"""The report's figures."""

from __future__ import annotations

from timeprest.report import MinibatchReport, Report, StageReport, StageStep


def test_means_over_the_report() -> None:
    rep = Report(stages=[StageReport(0), StageReport(1)])
    rep.minibatches = [
        MinibatchReport(0, 1.0, [StageStep([0, 0], 1, [1, 1], 0.5), StageStep([0, 0], 0, [0, 0])]),
        MinibatchReport(1, 0.5, [StageStep([1, 1], 3, [2, 2], 0.25), StageStep([1, 1], 1, [0, 0])]),
    ]
    assert rep.mean_staleness(0) == 1.5 and rep.mean_staleness(1) == 0.0
    assert rep.mean_relative_distance(0) == 0.375
    d = rep.to_dict()
    assert d["minibatches"][1]["stages"][0]["staleness"] == [2, 2]
    assert Report().mean_staleness(0) == 0.0
