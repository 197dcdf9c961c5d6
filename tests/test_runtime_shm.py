"""The shared-memory transport: bitwise the process group's results, clean files, fast failures.

Each test spawns its ranks (gloo, a file rendezvous in ``tmp_path``, one
thread). ``RuntimeOptions(transport="auto")``, the default, already runs the
equivalence and failure jobs of tests/test_runtime.py over shared memory;
here both transports train the same pipelines and must agree bit for bit.
"""

from __future__ import annotations

import gc
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import timeprest
from helpers import init_group, spawn
from test_runtime import make_batches, make_stage
from timeprest.engine.runtime import RuntimeOptions
from timeprest.engine.runtime.shm import _why_not
from timeprest.errors import ConfigError
from timeprest.sim.profile import action_costs

METHODS = ("v-timeprest", "i-timeprest", "pipedream", "1f1b")
# uneven micro-batches and a short last mini-batch: several message sizes per channel
ROWS = (9, 9, 9, 4)
F64 = torch.float64


def pipeline(world: int, method: str, opts: RuntimeOptions, stage_fn: Any = None):
    return timeprest.Pipeline(
        stage_fn or (lambda s: make_stage(s, world, F64)),
        method=method,
        num_microbatches=2,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        loss_fn=nn.functional.mse_loss,
        engine="distributed",
        runtime=opts,
    )


def _equal_worker(rank: int, world: int, tmp: str) -> None:
    init_group(rank, world, f"{tmp}/rdv")
    out: dict[str, Any] = {"dirs": []}
    for transport in ("shm", "process-group"):
        for method in METHODS:
            pipe = pipeline(world, method, RuntimeOptions(timeout=30, transport=transport))
            engine: Any = pipe._engine
            assert engine.transport == transport
            runner = pipe.runners[0]
            runner.action_times = []  # timed: the waiting counted apart, the numbers unchanged
            # two train() calls over the channels set up once by the pipeline
            losses = pipe.train(make_batches(F64, ROWS)) + pipe.train(make_batches(F64, (5, 5)))
            out[f"timed/{transport}/{method}"] = (
                runner.recv_seconds,
                runner.wait_seconds,
                list(runner.action_times),
            )
            if transport == "shm":
                directory = engine._links.directory
                out["dirs"].append(directory)
                # mapped files are unlinked (an empty directory may be gone already)
                try:  # (another rank may remove it between a check and the listing)
                    left = os.listdir(directory)
                except FileNotFoundError:
                    left = []
                out[f"left/{method}"] = sorted(left)
            module = pipe.stages[rank]
            assert module is not None
            out[f"{transport}/{method}"] = {
                "losses": losses,
                "state": {k: v.clone() for k, v in module.state_dict().items()},
            }
            del pipe, engine
            gc.collect()
    timed = pipeline(world, "v-timeprest", RuntimeOptions(timeout=30))
    out["time_actions"] = timed.time_actions(make_batches(F64, ROWS), skip=1)
    out["time_actions/done"] = timed.minibatches_done
    del timed
    auto: Any = pipeline(world, "gpipe", RuntimeOptions(timeout=30))._engine
    out["auto"] = auto.transport
    out["dirs"].append(auto._links.directory)  # removed at interpreter exit
    try:
        pipeline(world, "gpipe", RuntimeOptions(transport="shm" if rank else "process-group"))
        out["mixed"] = "no error"
    except ConfigError as exc:
        out["mixed"] = str(exc)
    torch.save(out, f"{tmp}/rank{rank}.pt")


@pytest.mark.parametrize("world", [2, 3])
def test_shm_matches_the_process_group_bitwise(world: int, tmp_path: Path) -> None:
    assert spawn(_equal_worker, world, tmp_path, limit=120) == [0] * world
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for method in METHODS:
        stages = [make_stage(s, world, F64) for s in range(world)]
        emulated = timeprest.Pipeline(
            stages,
            method=method,
            num_microbatches=2,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
            loss_fn=nn.functional.mse_loss,
        )
        want = emulated.train(make_batches(F64, ROWS)) + emulated.train(make_batches(F64, (5, 5)))
        for r in range(world):
            shm, pg = got[r][f"shm/{method}"], got[r][f"process-group/{method}"]
            assert shm["losses"] == pg["losses"] == want, (method, r)
            for k, v in stages[r].state_dict().items():
                assert torch.equal(shm["state"][k], pg["state"][k]), (method, r, k)
                assert torch.equal(shm["state"][k], v), (method, r, k)
            assert got[r][f"left/{method}"] == [], (method, r)
            for transport in ("shm", "process-group"):
                recv, wait, actions = got[r][f"timed/{transport}/{method}"]
                assert 0.0 < wait <= recv, (method, r, transport)  # every rank receives
                assert wait == pytest.approx(sum(a[4] for a in actions))
                assert all(0.0 <= a[4] <= a[3] for a in actions)
                f, b, _ = action_costs(actions)
                assert f > 0 and b > 0
    # every rank has every stage's costs, as each stage's own rank timed them
    costs = got[0]["time_actions"]
    assert len(costs) == world and all(f > 0 and b > 0 and u > 0 for f, b, u in costs)
    assert all(got[r]["time_actions"] == costs for r in range(world))
    assert all(got[r]["time_actions/done"] == len(ROWS) for r in range(world))  # it trained
    for r in range(world):
        assert got[r]["auto"] == "shm"
        assert "the ranks ask for different transports" in got[r]["mixed"], got[r]["mixed"]
        # every pipeline's directory went with it
        assert len(got[r]["dirs"]) == len(METHODS) + 1
        for d in got[r]["dirs"]:
            assert not os.path.exists(d), d


class _Slow(nn.Module):
    """Sleeps on every other forward, so that its sender runs ahead and slots are reused
    while earlier messages wait to be read."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls % 2:
            time.sleep(0.003)
        return self.inner(x)


LONG = (6,) * 30  # 30 mini-batches of 2 micro-batches: 60 messages each way


def _reuse_worker(rank: int, world: int, tmp: str) -> None:
    init_group(rank, world, f"{tmp}/rdv")

    def stage_fn(s: int) -> nn.Module:
        return _Slow(make_stage(s, world, F64)) if s == 1 else make_stage(s, world, F64)

    out: dict[str, Any] = {}
    for method in ("v-timeprest", "pipedream"):
        pipe = pipeline(world, method, RuntimeOptions(timeout=30, transport="shm"), stage_fn)
        out[method] = pipe.train(make_batches(F64, LONG))
        engine: Any = pipe._engine
        out[f"slots/{method}"] = {p: len(o.slots) for p, o in engine._links.outs.items()}
        del pipe, engine
        gc.collect()
    torch.save(out, f"{tmp}/rank{rank}.pt")


def test_slots_are_reused_and_a_slow_reader_reads_what_was_sent(tmp_path: Path) -> None:
    world = 2
    assert spawn(_reuse_worker, world, tmp_path, limit=120) == [0] * world
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for method in ("v-timeprest", "pipedream"):
        emulated = timeprest.Pipeline(
            [make_stage(s, world, F64) for s in range(world)],
            method=method,
            num_microbatches=2,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
            loss_fn=nn.functional.mse_loss,
        )
        want = emulated.train(make_batches(F64, LONG))
        for r in range(world):
            assert got[r][method] == want, (method, r)
            # 60 messages each way went through a few slots: the receiver's proof freed them
            for peer, count in got[r][f"slots/{method}"].items():
                assert 1 <= count <= 6, (method, r, peer, count)


class _Fail(nn.Module):
    """On its n-th forward: kills its process (``kill``) or returns NaN."""

    def __init__(self, inner: nn.Module, n: int, kill: bool, stamp: str) -> None:
        super().__init__()
        self.inner, self.n, self.kill, self.stamp, self.calls = inner, n, kill, stamp, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = self.inner(x)
        if self.calls == self.n:
            Path(self.stamp).write_text(repr(time.time()))
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            return y * float("nan")
        return y


def _failure_worker(rank: int, world: int, tmp: str, kill: bool) -> None:
    init_group(rank, world, f"{tmp}/rdv", timeout=5)
    last = world - 1

    def stage_fn(s: int) -> nn.Module:
        inner = make_stage(s, world, F64)
        return _Fail(inner, 5, kill, f"{tmp}/failed.time") if s == last else inner

    method = "pipedream" if kill else "gpipe"  # gpipe: the neighbours wait in receives
    pipe = pipeline(world, method, RuntimeOptions(timeout=5, transport="shm"), stage_fn)
    directory = pipe._engine._links.directory  # type: ignore[union-attr]
    Path(f"{tmp}/dir").write_text(directory)
    try:
        pipe.train(make_batches(F64, (4,) * 8))
        text = "no error"
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
    Path(f"{tmp}/rank{rank}.txt").write_text(text)
    Path(f"{tmp}/rank{rank}.time").write_text(repr(time.time()))
    if rank == last:
        time.sleep(4)  # alive: the neighbours learn of it by its channels, not by its exit


@pytest.mark.parametrize("kill", [True, False], ids=["killed", "nan"])
def test_shm_failures_cascade_and_leave_nothing(kill: bool, tmp_path: Path) -> None:
    world = 3
    codes = spawn(_failure_worker, world, tmp_path, kill, limit=60)
    assert codes == ([0, 0, -signal.SIGKILL] if kill else [0, 0, 0])
    failed_at = float((tmp_path / "failed.time").read_text())
    for r in range(world - 1 if kill else world):
        text = (tmp_path / f"rank{r}.txt").read_text()
        if kill:
            assert text.startswith("StageFailure"), text
            assert "rank 2 (stage 2) stopped without reporting an error" in text, text
            assert "was waiting for it at action" in text, text
        elif r == world - 1:
            assert text.startswith("NonFiniteLossError"), text
        else:
            assert text.startswith("StageFailure"), text
            assert "rank 2 (stage 2) failed at action" in text, text
        # well within the 5 s timeout: the closed record, or the liveness check
        assert float((tmp_path / f"rank{r}.time").read_text()) - failed_at < 3.0, r
    # the survivors removed the files of the rank that died, and the directory
    assert not os.path.exists((tmp_path / "dir").read_text())


def test_transport_is_checked() -> None:
    with pytest.raises(ConfigError, match="unknown transport 'tcp'"):
        RuntimeOptions(transport="tcp")  # type: ignore[arg-type]
    here = {"host": "a", "boot": "b", "pidns": "p", "dir": "/dev/shm", "dev": [1, 2]}
    ok = {**here, "problem": None}
    assert _why_not([ok, ok], "gloo") is None
    assert "backend is nccl" in str(_why_not([ok, ok], "nccl"))
    assert "rank 1 on c" in str(_why_not([ok, {**ok, "host": "c"}], "gloo"))
    assert "rank 1: /x is not writable" in str(
        _why_not([ok, {**ok, "problem": "/x is not writable"}], "gloo")
    )


@pytest.fixture
def loop(tmp_path: Path):
    """Links of rank 0 to itself in one process: a send is received by the same object."""
    from timeprest.engine.runtime.shm import _identity
    from timeprest.engine.runtime.shm_links import ShmLinks

    links = ShmLinks(str(tmp_path / "links"), 0, [0], [_identity(str(tmp_path))])
    links.make_fifos()
    links.connect()
    links.unlink_fifos()
    yield links
    links.close(notify=False)
    assert not (tmp_path / "links").exists()


def test_links_carry_every_dtype_and_reuse_slots(loop: Any) -> None:
    values = [
        torch.randn(3, 4, dtype=torch.float64),
        torch.randn(2, 2, dtype=torch.complex64),
        torch.tensor([True, False, True]),
        torch.tensor(7, dtype=torch.int64),  # 0-d
        torch.empty(0, 5),
        torch.randn(3000),  # larger than one page
    ]
    for i, x in enumerate(values):
        slot = loop.post(0, "act", (i, 0), x)
        got, spec = loop.take(0, (i, 0), "m", 5.0)
        assert spec == (tuple(x.shape), x.dtype)
        assert got.dtype == x.dtype and torch.equal(got, x)
        assert got.data_ptr() != slot.data.data_ptr()  # a fresh copy, not the slot
        slot.busy = False
    # every slot was freed: the small messages shared one, the large one made another
    assert len(loop.outs[0].slots) == 2
    assert os.listdir(loop.directory) == []  # the receiver unlinked what it mapped


def test_links_say_when_shared_memory_is_full(loop: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from timeprest.engine.runtime.shm_links import ShmFull

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ShmFull, match="--shm-size.*transport='process-group'"):
        loop.post(0, "act", (0, 0), torch.randn(10))


def test_links_wait_for_room_when_the_reader_is_behind(tmp_path: Path) -> None:
    import fcntl

    from timeprest.engine.runtime.failures import CommError
    from timeprest.engine.runtime.shm import _identity
    from timeprest.engine.runtime.shm_links import ShmLinks

    me = _identity(str(tmp_path))
    a, b = (ShmLinks(str(tmp_path / "links"), r, [1 - r], [me, me]) for r in (0, 1))
    for step in ("make_fifos", "connect", "unlink_fifos"):
        for links in (a, b):
            getattr(links, step)()
    try:
        # a pipe of one page holds 32 records: the 33rd send waits, here until its timeout
        fcntl.fcntl(b.ins[0].fd, fcntl.F_SETPIPE_SZ, 4096)
        x = torch.randn(4)
        for i in range(32):
            a.post(1, "act", (i, 0), x, "m", 0.5).busy = False
        with pytest.raises(CommError, match="no room in 0.5 s"):
            a.post(1, "act", (32, 0), x, "m", 0.5)
        for i in range(4):  # the reader catches up: there is room again
            assert torch.equal(b.take(0, (i, 0), "m", 5.0)[0], x)
        a.post(1, "act", (32, 0), x, "m", 0.5)
        assert torch.equal(b.take(0, (32, 0), "m", 5.0)[0], x)
    finally:
        a.close(notify=False)
        b.close(notify=False)


def test_a_sender_waiting_for_room_reads_its_own_records(loop: Any) -> None:
    import fcntl

    # to itself, through a FIFO of 32 records: the wait for room reads them into the
    # inbox, so 40 sends in a row do not wait for a timeout
    fcntl.fcntl(loop.ins[0].fd, fcntl.F_SETPIPE_SZ, 4096)
    xs = [torch.full((3,), float(i)) for i in range(40)]
    for i, x in enumerate(xs):
        loop.post(0, "act", (i, 0), x, "m", 2.0)
    assert len(loop.ins[0].inbox) >= 8  # read while waiting for room
    for i, x in enumerate(xs):
        assert torch.equal(loop.take(0, (i, 0), "m", 5.0)[0], x)


def test_spin_is_checked_and_defaults_to_cores_of_their_own(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from timeprest.engine.runtime import shm

    for bad in (-1.0, float("inf"), "2ms", True):
        with pytest.raises(ConfigError, match="spin must be seconds >= 0 or None"):
            RuntimeOptions(spin=bad)  # type: ignore[arg-type]
    assert shm.spin_seconds(0.25, 64) == 0.25  # asked: as asked, however crowded
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(shm, "CPU_MAX", str(quota))
    quota.write_text("max 100000\n")  # no quota: the affinity's 4 cores
    assert shm.spin_seconds(None, 2) == shm.SPIN  # 2 ranks x 2 threads on 4 cores
    assert shm.spin_seconds(None, 3) == 0.0  # 6 threads on 4 cores: no spinning
    quota.write_text("200000 100000\n")  # docker --cpus=2 on those 4 cores
    assert shm.spin_seconds(None, 2) == 0.0


def _spinning(loop: Any, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The loop's sleeps in poll, recorded (their timeouts)."""
    sleeps: list[float] = []
    wait = loop._wait

    def recorded(seconds: float, write_fd: int | None = None) -> None:
        sleeps.append(seconds)
        wait(seconds, write_fd)

    monkeypatch.setattr(loop, "_wait", recorded)
    return sleeps


def test_a_receive_spins_before_it_sleeps(loop: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    sleeps = _spinning(loop, monkeypatch)

    def receive_late(spin: float, key: tuple[int, int]) -> None:
        """A receive whose message is sent 0.1 s late."""
        loop.spin = spin
        sender = threading.Timer(0.1, lambda: loop.post(0, "act", key, torch.ones(3)))
        sender.start()
        got, _ = loop.take(0, key, "m", 5.0)
        sender.join()
        assert torch.equal(got, torch.ones(3))
        for slot in loop.outs[0].slots:
            slot.busy = False

    receive_late(0.0, (1, 0))
    assert sleeps  # asleep in poll until the message
    sleeps.clear()
    before = loop.waited
    receive_late(5.0, (2, 0))
    assert sleeps == []  # reading the FIFO all along
    assert loop.waited - before >= 0.09  # and that was waiting


def test_a_receive_counts_its_waiting_only(loop: Any) -> None:
    """Transport.waited: a message already sent costs a receive no waiting worth the
    name; one that comes 0.1 s late, those 0.1 s, asleep in poll or spinning."""
    import threading

    loop.post(0, "act", (0, 0), torch.ones(3))
    loop.take(0, (0, 0), "m", 5.0)
    assert 0.0 < loop.waited < 0.05  # the record had to be read from the FIFO
    for t, spin in ((1, 0.0), (2, 5.0)):
        loop.spin = spin
        before = loop.waited
        sender = threading.Timer(0.1, loop.post, (0, "act", (t, 0), torch.ones(3)))
        sender.start()
        loop.take(0, (t, 0), "m", 5.0)
        sender.join()
        assert 0.09 <= loop.waited - before < 2.0, spin
        for slot in loop.outs[0].slots:
            slot.busy = False


def test_a_spinning_receive_keeps_its_timeout_and_hears_a_close(
    loop: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from timeprest.engine.runtime.failures import CommError

    sleeps = _spinning(loop, monkeypatch)
    loop.spin = 5.0
    started = time.monotonic()
    with pytest.raises(CommError, match="no message in 0.2 s"):
        loop.take(0, (1, 0), "m", 0.2)
    assert time.monotonic() - started < 2.0 and sleeps == []  # the timeout, not the spin
    from timeprest.engine.runtime.shm_links import _CLOSED, _RECORD, MAX_DIMS

    closed = _RECORD.pack(_CLOSED, *([0] * (7 + MAX_DIMS)))  # what a stopping rank writes
    closer = threading.Timer(0.05, lambda: os.write(loop.outs[0].fd, closed))
    closer.start()
    with pytest.raises(CommError, match="closed its channels"):
        loop.take(0, (2, 0), "m", 3.0)
    closer.join()
    assert sleeps == []
