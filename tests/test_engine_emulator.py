"""The emulator: lowered programs through the checking mailbox; custom schedules; streaming."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import timeprest
from timeprest.engine.emulator import run_emulated
from timeprest.errors import ConfigError, DataError, ScheduleError
from timeprest.policy import Policy, plan_versions
from timeprest.schedule import build_schedule
from timeprest.schedule.lower import Lowered, lower
from timeprest.stage import SplitBatches, StageRunner


def stages(w: int = 2) -> list[nn.Module]:
    torch.manual_seed(0)
    dims = [3] + [4] * (w - 1) + [2]
    return [nn.Sequential(nn.Linear(dims[s], dims[s + 1]), nn.Tanh()) for s in range(w)]


def batches(num: int = 3, rows: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(rows, 3, generator=g), torch.randn(rows, 2, generator=g)) for _ in range(num)
    ]


def sgd(p: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(p, lr=0.1)


def runners_for(sched, policy: Policy) -> list[StageRunner]:
    mods = stages(sched.num_stages)
    w, n = sched.num_stages, sched.num_microbatches
    out = []
    for s, (m, plan) in enumerate(zip(mods, plan_versions(sched, policy))):
        loss = nn.functional.mse_loss if s == w - 1 else None
        r = StageRunner(s, m, w, n, policy, sgd, loss)
        r.begin(plan, 0)
        out.append(r)
    return out


def test_a_permuted_receive_order_names_stage_action_and_message() -> None:
    sched = build_schedule("gpipe", 2, 2, 1)
    low = lower(sched)
    prog = list(low.programs[1])
    i, j = [k for k, op in enumerate(prog) if op.op == "recv"][:2]  # <F0.0 and <F0.1
    prog[i], prog[j] = prog[j], prog[i]
    bad = Lowered(sched, (low.programs[0], tuple(prog)))
    runners = runners_for(sched, Policy("live", "latest"))
    with pytest.raises(ScheduleError) as err:
        run_emulated(bad, runners, SplitBatches(batches(1), 2))
    text = str(err.value)
    assert "stage 1" in text and "F0.1" in text  # the action that expected the wrong message
    assert "the activation of F0.1 from stage 0" in text  # what it expected
    assert "the activation of F0.0 from stage 0" in text  # what was at the head of the channel


def test_a_missing_send_is_a_deadlock() -> None:
    sched = build_schedule("gpipe", 2, 1, 1)
    low = lower(sched)
    no_send = tuple(op for op in low.programs[0] if op.op != "send")
    bad = Lowered(sched, (no_send, low.programs[1]))
    with pytest.raises(ScheduleError, match="deadlock"):
        run_emulated(bad, runners_for(sched, Policy("live", "latest")), SplitBatches(batches(1), 1))


def make_pipe(schedule=None, method: str = "gpipe", n: int | None = 2) -> timeprest.Pipeline:
    return timeprest.Pipeline(
        stages(), method=method, num_microbatches=n, optimizer=sgd,
        loss_fn=nn.functional.mse_loss, schedule=schedule,
    )  # fmt: skip


def test_a_custom_schedule_as_program_text_runs_like_the_builder() -> None:
    built = build_schedule("gpipe", 2, 2, 3)
    text = "\n".join(" ".join(p) for p in built.to_text())
    custom = make_pipe(schedule=text, n=None)
    assert custom.schedule_for(3).to_text() == built.to_text()
    reference = make_pipe()
    assert custom.train(batches()) == reference.train(batches())
    for a, b in zip(custom.stages, reference.stages):
        assert a is not None and b is not None
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb)


def test_a_custom_schedule_is_validated_and_sized() -> None:
    with pytest.raises(ScheduleError):
        make_pipe(schedule="F0.0 B0.0 U0\nF0.0 U0 B0.0", n=None)  # U before its backward
    pipe = make_pipe(schedule="F0.0 B0.0 U0\nF0.0 B0.0 U0", n=None)
    with pytest.raises(ConfigError, match="custom schedule is for 1 mini-batches"):
        pipe.train(batches(2))
    with pytest.raises(ConfigError, match="N=1"):
        make_pipe(schedule="F0.0 B0.0 U0\nF0.0 B0.0 U0", n=2)


class OnceOnly:
    """A generator of mini-batches that fails if read twice or ahead of the in-flight window."""

    def __init__(self, data, pipe_holder: dict, window: int) -> None:
        self.data, self.holder, self.window = data, pipe_holder, window
        self.started = False
        self.pulled = 0

    def __iter__(self):
        if self.started:
            raise AssertionError("the batches were read twice")
        self.started = True
        for t, b in enumerate(self.data):
            runner0 = self.holder["pipe"].runners[0]
            done = len(runner0.steps.get(t - self.window, timeprest.report.StageStep()).staleness)
            # mini-batch t may be pulled only once mini-batch t - window has left stage 0
            if t >= self.window and done == 0:
                raise AssertionError(f"mini-batch {t} was read ahead of the in-flight window")
            self.pulled += 1
            yield b


@pytest.mark.parametrize("method", ["gpipe", "pipedream", "v-timeprest", "i-timeprest"])
def test_training_streams_a_generator_within_the_in_flight_window(method: str) -> None:
    data = batches(6)
    n = None if method == "pipedream" else 2
    holder: dict = {}
    pipe = make_pipe(method=method, n=n)
    holder["pipe"] = pipe
    w = pipe.num_stages
    stream = OnceOnly(data, holder, window=w + 1)
    losses = pipe.train(iter(stream), num_minibatches=len(data))
    assert stream.pulled == len(data)
    reference = make_pipe(method=method, n=n)
    assert losses == reference.train(data)


def test_a_stream_shorter_than_announced_is_a_data_error() -> None:
    pipe = make_pipe()
    with pytest.raises(DataError, match="ended after 2 mini-batches"):
        pipe.train(iter(batches(2)), num_minibatches=3)


def test_an_iterator_of_unknown_length_is_read_whole() -> None:
    pipe, reference = make_pipe(), make_pipe()
    assert pipe.train(iter(batches(3))) == reference.train(batches(3))


def test_the_report_holds_the_last_call_only() -> None:
    pipe = make_pipe()
    pipe.train(batches(3))
    pipe.train(batches(2))
    assert [m.minibatch for m in pipe.report.minibatches] == [3, 4]
