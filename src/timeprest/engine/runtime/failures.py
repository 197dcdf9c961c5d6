"""The failure protocol: every rank that stops says why, and its neighbours name it.

A rank that raises (a user error, a non-finite loss, a shape mismatch) writes
a record to the process group's store under ``fail/<rank>``, tears its
process groups down (its sockets close) and re-raises. A neighbour blocked on
it sees the connection close, reads the records, names the failed rank, its
stage and its action in a :class:`~timeprest.errors.StageFailure`, and tears
down too, so the failure cascades through the pipeline in milliseconds. A
rank killed outright leaves no record: its neighbours name it by the message
they were waiting for.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from timeprest.engine.runtime.layout import Layout


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def stage_name(rank: int, layout: Layout | None = None) -> str:
    """``rank R (stage S)``, or ``rank R (replica P, stage S)`` with data-parallel replicas."""
    return f"rank {rank} (stage {rank})" if layout is None else layout.name(rank)


class CommError(Exception):
    """A wait or collective failed: a peer closed its connection or timed out."""

    def __init__(self, peer: int | None, what: str, cause: BaseException) -> None:
        super().__init__(f"{what}: {first_line(cause)}")
        self.peer = peer
        self.what = what
        self.cause = cause


def failure_record(exc: BaseException, rank: int, where: str) -> dict[str, Any]:
    """What a failing rank writes to the store: it raised, or it lost contact with a peer."""
    if isinstance(exc, CommError):
        record: dict[str, Any] = {
            "kind": "lost",
            "peer": exc.peer,
            "what": exc.what,
            "detail": first_line(exc.cause),
        }
    else:
        record = {"kind": "raised", "error": first_line(exc)}
    record.update(rank=rank, where=where, time=time.time())
    return record


def publish(store: Any, record: dict[str, Any]) -> None:
    try:
        store.set(f"fail/{record['rank']}", json.dumps(record))
    except Exception:  # the store may be gone with its host
        pass


def read_records(store: Any, world_size: int) -> dict[int, dict[str, Any]]:
    records: dict[int, dict[str, Any]] = {}
    for r in range(world_size):
        try:
            if store.check([f"fail/{r}"]):
                records[r] = json.loads(store.get(f"fail/{r}").decode())
        except Exception:  # the store may be gone with its host
            continue
    return records


def diagnose(
    records: dict[int, dict[str, Any]], mine: dict[str, Any], layout: Layout | None = None
) -> str:
    """Name the rank that failed first: the earliest that raised, else the end of the chain
    of ranks that waited on each other (from this rank's record, or else from another
    rank's that leads to a rank that left none: a collective names no single peer)."""
    records = {**records, mine["rank"]: mine}
    raised = sorted((r for r in records.values() if r["kind"] == "raised"), key=lambda r: r["time"])
    if raised:
        first = raised[0]
        return f"{stage_name(first['rank'], layout)} failed at {first['where']}: {first['error']}"
    chains = [_chain(records, mine, layout)]
    chains += [
        _chain(records, r, layout) for r in sorted(records.values(), key=lambda r: r["time"])
    ]
    silent = [text for found, text in chains if found]
    return silent[0] if silent else chains[0][1]


def _chain(
    records: dict[int, dict[str, Any]], start: dict[str, Any], layout: Layout | None
) -> tuple[bool, str]:
    """Follow who waited on whom from ``start``; (whether it ends at a silent rank, message)."""

    def name(rank: int) -> str:
        return stage_name(rank, layout)

    link = start
    seen = {start["rank"]}
    while link.get("peer") is not None:
        peer = int(link["peer"])
        if peer in records and peer not in seen and records[peer]["kind"] == "lost":
            seen.add(peer)
            link = records[peer]
            continue
        if peer in records:
            break
        return True, (
            f"{name(peer)} stopped without reporting an error (killed, or crashed "
            f"outside Python) before it sent {link['what']}; {name(link['rank'])} "
            f"was waiting for it at {link['where']} ({link['detail']})"
        )
    return False, (
        f"{name(link['rank'])} lost contact at {link['where']} while waiting for "
        f"{link['what']}: {link['detail']}"
    )
