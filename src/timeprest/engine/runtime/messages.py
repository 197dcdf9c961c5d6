"""What one rank's transport needs to know of its traffic, read off the lowered programs.

The lowered programs (:mod:`timeprest.schedule.lower`) list every receive and
send in the order a stage makes them. From them each rank derives, per
channel, the order of the messages it receives (to post receives ahead) and
sends, and when a send is proved complete without waiting for it: a send to
peer p is done once we have received a message that p sends only after
consuming ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from timeprest.schedule.builders import Schedule
from timeprest.schedule.lower import Kind, Lowered, lower

Key = tuple[int, int]  # (minibatch, microbatch) within one train() call
Event = tuple[Literal["send", "recv"], int, Kind, Key]  # op, peer, kind, key


def stage_events(lowered: Lowered | Schedule, stage: int) -> list[Event]:
    """Messages ``stage`` receives and sends, in the order its lowered program makes them."""
    low = lowered if isinstance(lowered, Lowered) else lower(lowered)
    out: list[Event] = []
    for op in low.programs[stage]:
        m = op.message
        if op.op == "recv":
            assert m is not None
            out.append(("recv", m.src, m.kind, m.key))
        elif op.op == "send":
            assert m is not None
            out.append(("send", m.dst, m.kind, m.key))
    return out


@dataclass
class MessagePlan:
    """Per channel kind: receives in consumption order, sends in issue order, and proofs."""

    recv: dict[Kind, list[Key]]
    send: dict[Kind, list[Key]]
    # sends proved complete once this receive has completed (the peer sent the
    # received message only after consuming ours)
    release: dict[tuple[Kind, Key], list[tuple[Kind, Key]]]
    # sends to the same peer that precede this receive in program order (NCCL
    # matches point-to-point operations per pair in issue order)
    sends_before: dict[tuple[Kind, Key], int]


def plan_messages(lowered: Lowered | Schedule, stage: int) -> MessagePlan:
    """The message plan of ``stage`` (the channels' agreement is checked by ``lower``)."""
    low = lowered if isinstance(lowered, Lowered) else lower(lowered)
    w = low.schedule.num_stages
    recv: dict[Kind, list[Key]] = {"act": [], "grad": []}
    send: dict[Kind, list[Key]] = {"act": [], "grad": []}
    sends_before: dict[tuple[Kind, Key], int] = {}
    sent_to: dict[int, int] = {}
    for op, peer, kind, key in stage_events(low, stage):
        if op == "recv":
            recv[kind].append(key)
            sends_before[(kind, key)] = sent_to.get(peer, 0)
        else:
            send[kind].append(key)
            sent_to[peer] = sent_to.get(peer, 0) + 1
    release: dict[tuple[Kind, Key], list[tuple[Kind, Key]]] = {}
    for peer in (stage - 1, stage + 1):
        if not 0 <= peer < w:
            continue
        out_kind: Kind = "act" if peer > stage else "grad"
        back_kind: Kind = "grad" if peer > stage else "act"
        pending: list[Key] = []
        for op, p, _kind, key in stage_events(low, peer):
            if p != stage:
                continue
            if op == "recv":
                pending.append(key)
            elif pending:
                release[(back_kind, key)] = [(out_kind, k) for k in pending]
                pending = []
    return MessagePlan(recv, send, release, sends_before)
