"""The impossibility of spec §2.3, replayed as two indistinguishable executions.

Path ``S -> I -> R`` with ``c1 = (S, I)`` and ``c2 = (I, R)``; ``S``, ``I`` and ``R`` are
honest. Each channel is represented by one arbiter node (its committee acting as one party).

* A NAIVE asynchronous protocol: ``c1`` locks ``a1``, asks ``c2`` to lock ``a2``; ``c2`` locks,
  settles (``R`` pre-signed its acceptance) and reports COMMIT. Termination demands that ``c1``
  resolves by a deadline ``t``, so ``c1`` refunds at ``t`` if no COMMIT arrived.

  - **E1**: ``c2`` is faulty and silent. Refunding at ``t`` is the only safe choice.
  - **E2**: ``c2`` is correct, but the scheduler delays all its messages past ``t`` (finite
    delays: a fair asynchronous schedule). ``c2`` settles (``I`` pays ``R``); ``c1`` cannot tell
    E2 from E1 (its recorded views are equal up to ``t``), so it refunds: honest ``I`` loses
    ``a2`` (balance security) and the payment is half settled (atomicity).
  - **Escape 1** (``c1`` waits for ``c2``, no deadline): safe in E2, but in E1 ``c1``'s lock is
    never resolved (termination).

* PSyncPCN (:mod:`decjax.payments.psyncpcn`) takes escape 1 and therefore needs correct
  channels: with ``W_2`` delayed (E2) it waits and commits; with ``W_2`` silent (E1, a faulty
  channel) it never terminates; with ``f+1`` equivocating members and a split registration it
  even produces conflicting decision QCs. ``W_1``'s views in E1 and E2 are also equal up to
  ``t``.

The proof idea is the spec's reconstruction [R] of the paper's theorem (abstract wording [V]).

Examples:
    >>> report = demonstrate()
    >>> report.views_identical, report.psync_views_identical
    (True, True)
    >>> [r.violations for r in report.rows if r.execution == "E2"][0]
    ('atomicity', 'balance_security')
"""

from __future__ import annotations

import dataclasses
from typing import Any

from decjax.payments.channels import hop_amounts
from decjax.payments.checkers import (
    PaymentRecord,
    Violation,
    check_atomicity,
    check_balance_security,
    check_conservation,
    check_termination,
)
from decjax.payments.committee import Crashed, Equivocating
from decjax.payments.events import Node, Simulator
from decjax.payments.graph import ChannelGraph
from decjax.payments.network import AsyncNetwork, Envelope
from decjax.payments.psyncpcn import Adversary, PaymentSpec, run_psyncpcn

PATH = ("S", "I", "R")
VALUE, FEE = 10, 1


@dataclasses.dataclass(frozen=True)
class Msg:
    kind: str
    pid: str


class DelayFrom:
    """Unit delays, except that messages from senders starting with ``prefix`` arrive no
    earlier than ``until`` (finite, so the schedule is fair)."""

    def __init__(self, prefix: str | None = None, until: float = 0.0):
        self.prefix, self.until = prefix, until

    def delay(self, env: Envelope, net: AsyncNetwork) -> float:
        now = net.sim.now if net.sim is not None else 0.0
        if self.prefix is not None and env.src.startswith(self.prefix):
            return max(1.0, self.until - now)
        return 1.0


class NaiveArbiter(Node):
    """Arbiter of ``c1``: locks, asks ``c2``, settles on COMMIT; refunds at ``deadline`` unless
    ``deadline`` is None (escape 1: wait forever). Records its view."""

    def __init__(self, node_id: str, graph: ChannelGraph, rec: PaymentRecord,
                 deadline: float | None):
        super().__init__(node_id)
        self.graph, self.rec, self.deadline = graph, rec, deadline
        self.view: list[tuple[float, str, str, str]] = []

    def send(self, dst: str, message: Any) -> None:
        self.view.append((self.now, "send", message.kind, dst))
        super().send(dst, message)

    def on_message(self, src: str, message: Any) -> None:
        self.view.append((self.now, "recv", message.kind, src))
        ch, lock_id = self.graph.channel("c1"), self.rec.lock_ids[0]
        if message.kind == "START":
            ch.lock(lock_id, "S", self.rec.amounts[0], pid=self.rec.pid)
            self.send("C2", Msg("LOCK_REQ", self.rec.pid))
            if self.deadline is not None:
                self._sim().schedule_at(self.deadline, self._timeout)
        elif message.kind == "COMMIT" and ch.status(lock_id) == "locked":
            ch.settle(lock_id)

    def _timeout(self) -> None:
        self.view.append((self.now, "timer", "DEADLINE", ""))
        ch, lock_id = self.graph.channel("c1"), self.rec.lock_ids[0]
        if ch.status(lock_id) == "locked":
            ch.refund(lock_id)
            self.send("C2", Msg("ABORT", self.rec.pid))


class SecondArbiter(Node):
    """Arbiter of ``c2``: correct (lock, settle with R's pre-signed acceptance, report COMMIT)
    or silent (faulty)."""

    def __init__(self, node_id: str, graph: ChannelGraph, rec: PaymentRecord, silent: bool):
        super().__init__(node_id)
        self.graph, self.rec, self.silent = graph, rec, silent

    def on_message(self, src: str, message: Any) -> None:
        if self.silent or message.kind != "LOCK_REQ":
            return
        ch, lock_id = self.graph.channel("c2"), self.rec.lock_ids[1]
        ch.lock(lock_id, "I", self.rec.amounts[1], pid=self.rec.pid)
        ch.settle(lock_id)
        self.send(src, Msg("COMMIT", self.rec.pid))


@dataclasses.dataclass(frozen=True)
class Row:
    execution: str
    protocol: str
    c2: str
    outcomes: tuple[str, ...]
    violations: tuple[str, ...]
    details: tuple[str, ...] = ()


@dataclasses.dataclass
class ImpossibilityReport:
    """Rows per (execution, protocol), and the view comparisons up to the deadline ``t``."""

    t: float
    rows: list[Row]
    views: dict[str, tuple]
    views_identical: bool
    psync_views_identical: bool

    def row(self, execution: str, protocol: str) -> Row:
        return next(r for r in self.rows if (r.execution, r.protocol) == (execution, protocol))

    def __str__(self) -> str:
        head = ("execution", "protocol", "channel c2", "outcomes (c1, c2)", "violations")
        lines = [(r.execution, r.protocol, r.c2, ", ".join(r.outcomes),
                  ", ".join(r.violations) or "-") for r in self.rows]
        widths = [max(len(x[k]) for x in [head, *lines]) for k in range(len(head))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        out = [line.rstrip() for line in out + [fmt.format(*x) for x in lines]]
        out.append(f"c1's views in E1 and E2 identical up to t={self.t:g}: "
                   f"{self.views_identical} (naive); {self.psync_views_identical} (PSyncPCN W_1)")
        return "\n".join(out)


def _graph() -> ChannelGraph:
    g = ChannelGraph()
    g.add_channel("S", "I", 50, 50, cid="c1")
    g.add_channel("I", "R", 50, 50, cid="c2")
    return g


def _checks(rec: PaymentRecord, g: ChannelGraph, total: int,
            before: dict[str, int]) -> list[Violation]:
    rec.outcomes = rec.observed_outcomes(g)
    return (check_conservation(g, total) + check_balance_security([rec], g, before)
            + check_atomicity([rec], g) + check_termination([rec], g, PATH))


def _row(execution: str, protocol: str, c2: str, outcomes: list[str],
         found: list[Violation]) -> Row:
    return Row(execution, protocol, c2, tuple(outcomes), tuple(sorted({v.property
                                                                      for v in found})),
               tuple(v.detail for v in found))


def run_naive(execution: str, *, t: float = 10.0, wait: bool = False,
              seed: int = 0) -> tuple[Row, list]:
    """One naive execution (``E1``: c2 silent; ``E2``: c2 correct, delayed past ``t``)."""
    g = _graph()
    total, before = g.total_funds(), g.holdings()
    silent = execution == "E1"
    rec = PaymentRecord("p", PATH, ("c1", "c2"), hop_amounts(VALUE, [FEE]),
                        honest=frozenset(PATH),
                        correct_channels=frozenset({"c1"}) if silent else None)
    scheduler = DelayFrom(None if silent else "C2", t + 5.0)
    sim = Simulator(seed, AsyncNetwork(scheduler))
    c1 = sim.add_node(NaiveArbiter("C1", g, rec, None if wait else t))
    sim.add_node(SecondArbiter("C2", g, rec, silent))
    sim.add_node(Node("S"))
    if silent:
        sim.network.mark_faulty("C2")
    sim.send("S", "C1", Msg("START", rec.pid))
    sim.run()
    c2 = "faulty, silent" if silent else f"correct, delayed past t={t:g}"
    protocol = "naive-wait" if wait else "naive-timeout"
    found = _checks(rec, g, total, before)
    return _row(execution, protocol, c2, rec.outcomes, found), c1.view


def _psync_view(trace: list, member: str, t: float) -> tuple:
    return tuple((e.time, dict(e.data)["src"], dict(e.data)["kind"]) for e in trace
                 if e.kind == "deliver" and dict(e.data)["dst"] == member and e.time <= t)


def run_psync(execution: str, *, t: float = 10.0, seed: int = 0) -> tuple[Row, tuple]:
    """PSyncPCN on the same path: ``E1`` (all of W_2 silent), ``E2`` (W_2 delayed past ``t``),
    ``f+1`` (two equivocating W_2 members and a split registration)."""
    g = _graph()
    spec = PaymentSpec(PATH, VALUE, (FEE,))
    if execution == "E1":
        adv, c2 = Adversary(members={("c2", k): Crashed() for k in range(4)}), "faulty, silent"
    elif execution == "E2":
        adv, c2 = Adversary(), f"correct, delayed past t={t:g}"
    else:
        adv = Adversary(members={("c2", 0): Equivocating(), ("c2", 1): Equivocating()},
                        split={"c2": (3,)})
        c2 = "f+1 of 3f+1 equivocating"
    run = run_psyncpcn(g, [spec], seed=seed, adversary=adv, signer="hmac",
                       scheduler=DelayFrom("W.c2." if execution == "E2" else None, t + 5.0))
    row = _row(execution, "PSyncPCN", c2, run.records[0].outcomes, run.check())
    return row, _psync_view(run.trace, "W.c1.m0", t)


def demonstrate(t: float = 10.0, seed: int = 0) -> ImpossibilityReport:
    """Run E1/E2 for the naive protocol, escape 1 and PSyncPCN; compare c1's views up to t."""
    rows, views = [], {}
    for wait in (False, True):
        for execution in ("E1", "E2"):
            row, view = run_naive(execution, t=t, wait=wait, seed=seed)
            rows.append(row)
            views[f"{row.protocol}/{execution}"] = tuple(v for v in view if v[0] <= t)
    for execution in ("E1", "E2", "f+1"):
        row, view = run_psync(execution, t=t, seed=seed)
        rows.append(row)
        views[f"PSyncPCN/{execution}"] = view
    same = views["naive-timeout/E1"] == views["naive-timeout/E2"]
    psync_same = views["PSyncPCN/E1"] == views["PSyncPCN/E2"]
    return ImpossibilityReport(t, rows, views, same, psync_same)


if __name__ == "__main__":
    print(demonstrate())
