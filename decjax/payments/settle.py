"""Settle a training run: pay every compute node for the microbatches it processed.

A training run records one ``"work"`` event per step in ``<workdir>/events.jsonl``
(:mod:`decjax.train.records`): the microbatches each stage's node processed,
``{"io": M, "stage0": n0, "stage1": n1, ...}``. Settling it means:

1. :func:`read_work` sums those events per node (the file is only read, never changed).
2. :func:`settlement_graph` builds a channel graph in which the payer (the job coordinator)
   reaches the compute nodes only over multi-hop paths through relay parties: the payer opens
   channels to entry relays, relays form a random tree, and every node hangs off one relay.
   There is no payer-node channel, so every payment has ``l >= 2`` hops.
3. :func:`settle` routes one payment per node, ``amount = microbatches * price`` (integer
   units), over a shortest path with enough free balance, and runs it through the chosen
   protocol's driver (:func:`~decjax.payments.psyncpcn.run_psyncpcn` or
   :func:`~decjax.payments.syncpcn.run_syncpcn`). Each intermediary earns ``fee`` per payment
   it forwards. Payments run one after another, each to quiescence, on the same ledger, so the
   messages, bytes and latency of each payment are counted exactly. After each payment every
   protocol checker runs (``PsyncRun.check()`` / ``SyncRun.violations()``), and the settlement
   adds its own ledger checks: the node received exactly its amount, each relay exactly its
   fee, the payer lost exactly amount + fees, and the total of all channel funds is unchanged.
   A payment that cannot be routed (no path with enough free balance) or that aborts is
   reported as ``failed`` with the reason, never dropped.
4. :func:`settle_run` does all of this for a workdir and writes ``<workdir>/settlement.json``
   atomically; an existing ``settlement.json`` is kept unless ``overwrite=True``.

Every delay is Δ (``delay="fixed"``, the default), so latencies are in message delays;
``delay="random"`` uses each protocol's seeded default network instead. Same seed, same
settlement. The protocols themselves are reconstructions of the SyncPCN/PSyncPCN paper
(``specs/payments.md``, items marked [R]); see their module docstrings.

Command line::

    python -m decjax.payments.settle --workdir=runs/x [--protocol=psyncpcn] [--price=1]

Examples:
    >>> s = settle({"io": 4, "stage0": 4, "stage1": 2}, price_per_microbatch=3, seed=0)
    >>> [(p.node, p.amount, p.status) for p in s.payments]
    [('io', 12, 'paid'), ('stage0', 12, 'paid'), ('stage1', 6, 'paid')]
    >>> s.total_paid, s.payer_cost == s.total_paid + s.total_fees, s.violations
    (30, True, [])
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import random
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from decjax.payments.channels import SETTLED, check_amount, hop_amounts
from decjax.payments.crypto import digest
from decjax.payments.errors import ConfigError, NoRoute, PaymentError
from decjax.payments.graph import ChannelGraph

PROTOCOLS = ("psyncpcn", "syncpcn")
DELAYS = ("fixed", "random")
SETTLEMENT_FILE = "settlement.json"
EVENTS_FILE = "events.jsonl"


class WorkLogError(PaymentError):
    """``events.jsonl`` cannot be settled: malformed line, no work events, double-counted step."""


class SettlementError(PaymentError):
    """A settlement broke an invariant (raised by :func:`settle` with ``strict=True``)."""


# -- reading the work log -------------------------------------------------------------------------
def read_work(events_path: str | os.PathLike) -> dict[str, int]:
    """Microbatches per node, summed over the ``"work"`` events of ``events_path``.

    Nodes appear in the order they first occur. Raises ``FileNotFoundError`` if the file is
    missing, and :class:`WorkLogError` for a malformed line (naming its number), a step recorded
    twice (it would be paid twice), or a log with no work events.
    """
    path = pathlib.Path(events_path)
    if not path.is_file():
        raise FileNotFoundError(f"no events file at {path} (a training run writes "
                                f"<workdir>/{EVENTS_FILE})")
    totals: dict[str, int] = {}
    seen: dict[Any, int] = {}
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError as err:
                raise WorkLogError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(event, dict) or "event" not in event:
                raise WorkLogError(f"{path}:{number}: expected an object with an 'event' key")
            if event["event"] != "work":
                continue
            step, work = event.get("step"), event.get("microbatches")
            if not isinstance(step, int) or isinstance(step, bool):
                raise WorkLogError(f"{path}:{number}: work event without an integer 'step'")
            if not isinstance(work, dict) or not work:
                raise WorkLogError(f"{path}:{number}: work event needs a non-empty "
                                   f"'microbatches' object, got {work!r}")
            for node, count in work.items():
                if not (isinstance(count, int) and not isinstance(count, bool) and count >= 0):
                    raise WorkLogError(f"{path}:{number}: microbatches of {node!r} must be an "
                                       f"int >= 0, got {count!r}")
            if step in seen:
                raise WorkLogError(f"{path}:{number}: step {step} already has a work event "
                                   f"(line {seen[step]}); refusing to pay it twice")
            seen[step] = number
            for node, count in work.items():
                totals[node] = totals.get(node, 0) + count
    if not seen:
        raise WorkLogError(f"{path}: no 'work' events (the run recorded no steps, or was "
                           "recorded before work events existed)")
    return totals


# -- the channel graph ----------------------------------------------------------------------------
def settlement_graph(nodes: Sequence[str], *, payer: str = "coordinator", n_relays: int = 4,
                     seed: int = 0, capacity: int = 1_000_000, entry_relays: int = 1,
                     relay_prefix: str = "relay") -> ChannelGraph:
    """A channel graph where ``payer`` reaches ``nodes`` only through relays.

    Relays ``relay0..`` form a random tree (relay ``i`` opens a channel to a random earlier
    relay); the payer opens channels to the first ``entry_relays`` relays; each node opens one
    channel to a relay drawn at random. Every channel holds ``capacity`` on each side, so any
    payment up to ``capacity`` (fees included) fits on any hop; a small ``capacity`` makes
    payments fail for lack of funds. Deterministic for a seed.
    """
    nodes = list(nodes)
    if not nodes:
        raise ConfigError("settlement_graph needs at least one node to pay")
    if not (isinstance(n_relays, int) and n_relays >= 1):
        raise ConfigError(f"n_relays must be an int >= 1, got {n_relays!r}")
    if not (isinstance(entry_relays, int) and 1 <= entry_relays <= n_relays):
        raise ConfigError(f"entry_relays must be in [1, n_relays={n_relays}], got "
                          f"{entry_relays!r}")
    check_amount(capacity, "channel capacity")
    relays = [f"{relay_prefix}{i}" for i in range(n_relays)]
    names = [payer, *relays, *nodes]
    if len(set(names)) != len(names):
        dup = sorted({x for x in names if names.count(x) > 1})
        raise ConfigError(f"payer, relay and node ids must be distinct; repeated: {dup}")
    rng = random.Random(int.from_bytes(digest("settlement-graph", seed)[:8], "big"))
    g = ChannelGraph()
    for i in range(1, n_relays):
        g.add_channel(relays[i], relays[rng.randrange(i)], capacity, capacity)
    for relay in relays[:entry_relays]:
        g.add_channel(payer, relay, capacity, capacity)
    for node in nodes:
        g.add_channel(node, relays[rng.randrange(n_relays)], capacity, capacity)
    return g


# -- the settlement -------------------------------------------------------------------------------
@dataclasses.dataclass
class NodePayment:
    """One node's payment.

    Attributes:
      status: ``paid``, ``failed`` (no route, or the protocol aborted; see ``reason``) or
        ``nothing_to_pay`` (zero microbatches).
      path: payer, relays, node. hops: ``l = len(path) - 1``.
      relay_fees: fee earned by each intermediary. fees: their sum.
      messages, bytes: counted by the simulator's network for this payment.
      latency: start to the payer's channel resolved, in simulated time (in units of Δ).
      received: what the node's holdings actually rose by (checked against ``amount``).
    """

    node: str
    microbatches: int
    amount: int
    status: str
    path: tuple[str, ...] = ()
    hops: int = 0
    relay_fees: dict[str, int] = dataclasses.field(default_factory=dict)
    fees: int = 0
    messages: int = 0
    bytes: int = 0
    latency: float | None = None
    received: int = 0
    reason: str = ""


@dataclasses.dataclass
class Settlement:
    """Result of :func:`settle`; ``summary()`` prints it as a table, ``to_dict()`` as JSON."""

    protocol: str
    seed: int
    price_per_microbatch: int
    fee: int
    f: int
    committee_size: int
    delay: str
    payer: str
    payments: list[NodePayment]
    relay_earnings: dict[str, int]
    payer_cost: int
    violations: list[str]
    graph: dict[str, Any]

    @property
    def total_paid(self) -> int:
        return sum(p.received for p in self.payments)

    @property
    def total_fees(self) -> int:
        return sum(self.relay_earnings.values())

    @property
    def messages(self) -> int:
        return sum(p.messages for p in self.payments)

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.payments)

    @property
    def failed(self) -> list[NodePayment]:
        return [p for p in self.payments if p.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.violations and not self.failed

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["payments"] = [{**p, "path": list(p["path"])} for p in out["payments"]]
        out.update(total_paid=self.total_paid, total_fees=self.total_fees,
                   messages=self.messages, bytes=self.bytes,
                   failed=[p.node for p in self.failed])
        return out

    def summary(self) -> str:
        head = ("node", "microbatches", "amount", "status", "hops", "path", "fees", "messages",
                "bytes", "latency")
        rows = [head]
        for p in self.payments:
            latency = "-" if p.latency is None else f"{p.latency:g}"
            rows.append((p.node, str(p.microbatches), str(p.amount),
                         p.status + (f" ({p.reason})" if p.reason else ""), str(p.hops),
                         " > ".join(p.path) or "-", str(p.fees), str(p.messages), str(p.bytes),
                         latency))
        widths = [max(len(r[k]) for r in rows) for k in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        earnings = ", ".join(f"{r} {v}" for r, v in self.relay_earnings.items()) or "none"
        lines += [
            "",
            f"protocol {self.protocol} (committees of {self.committee_size}, f = {self.f}), "
            f"{self.delay} delays (latency in units of Δ), seed {self.seed}",
            f"price {self.price_per_microbatch} per microbatch, fee {self.fee} per relay hop",
            f"paid {self.total_paid} to {sum(p.status == 'paid' for p in self.payments)} nodes, "
            f"fees {self.total_fees} ({earnings}); payer {self.payer} spent {self.payer_cost}",
            f"messages {self.messages}, bytes {self.bytes}",
            f"failed payments: {', '.join(p.node for p in self.failed) or 'none'}; "
            f"violations: {len(self.violations)}",
        ]
        lines += [f"  {v}" for v in self.violations]
        return "\n".join(lines)


def _route(graph: ChannelGraph, payer: str, node: str, value: int,
           fee: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Shortest path on which every hop's payer has free balance for its hop amount."""
    longest = len(graph.parties) - 1
    threshold = value
    while True:
        path = graph.path(payer, node, threshold)  # NoRoute propagates
        amounts = hop_amounts(value, [fee] * (len(path) - 2))
        chans = graph.route_channels(path)
        if all(ch.balances[u] >= a for ch, u, a in zip(chans, path, amounts, strict=False)):
            return path, amounts
        if threshold >= amounts[0] or len(path) - 1 >= longest:
            raise NoRoute(f"no route from {payer!r} to {node!r} with free balance for "
                          f"{value} plus fees")
        threshold = amounts[0]


def _seed_for(seed: int, k: int, node: str) -> int:
    return int.from_bytes(digest("settle-payment", seed, k, node)[:4], "big")


def _pay_psync(graph, path, value, fee, *, seed, f, signer, delay, delta):
    from decjax.payments.psyncpcn import FixedDelay, PaymentSpec, run_psyncpcn

    scheduler = FixedDelay(delta) if delay == "fixed" else None
    run = run_psyncpcn(graph, [PaymentSpec(path, value, (fee,) * (len(path) - 2))], seed=seed,
                       f=f, scheduler=scheduler, signer=signer)
    pid = run.records[0].pid
    latency = run.latency[pid].time / delta if pid in run.latency else None
    reason = "" if run.status[0] == "committed" else f"protocol status {run.status[0]}"
    return (run.records[0].outcomes, reason, run.stats, latency,
            [f"{v.property}: {v.detail}" for v in run.check()])


def _pay_sync(graph, path, value, fee, *, seed, f, signer, delay, delta):
    from decjax.payments.syncpcn import Adversary, SyncParams, run_syncpcn

    adversary = Adversary(delay=(lambda env: delta) if delay == "fixed" else None)
    run = run_syncpcn(graph, [(path[0], path[-1], value, path)],
                      params=SyncParams(delta=delta, fee=fee), seed=seed, adversary=adversary,
                      committee_f=f, signer=signer)
    rec = run.records[0]
    latency = run.latency[rec.pid]
    reason = "" if all(o == SETTLED for o in rec.outcomes) else f"hop outcomes {rec.outcomes}"
    return (rec.outcomes, reason, run.stats, None if latency is None else latency / delta,
            [f"{v.property}: {v.detail}" for v in run.violations()])


def check_options(*, price_per_microbatch: int, protocol: str = "psyncpcn", f: int = 1,
                  fee: int = 1, signer: str = "hmac", delay: str = "fixed", n_relays: int = 4,
                  seed: int = 0) -> None:
    """Raises :class:`ConfigError` naming the first of :func:`settle`'s options that is not
    allowed; a trainer calls it before training so that a bad option fails at once."""
    check_amount(price_per_microbatch, "price_per_microbatch")
    check_amount(fee, "fee", allow_zero=True)
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    if delay not in DELAYS:
        raise ConfigError(f"unknown delay model {delay!r}; expected one of {DELAYS}")
    if signer not in ("hmac", "ed25519"):
        raise ConfigError(f"signer must be 'hmac' or 'ed25519', got {signer!r}")
    for name, value in (("f", f), ("n_relays", n_relays)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
    if not (isinstance(seed, int) and not isinstance(seed, bool)):
        raise ConfigError(f"seed must be an int, got {seed!r}")


def settle(work: Mapping[str, int], *, price_per_microbatch: int, protocol: str = "psyncpcn",
           seed: int = 0, graph: ChannelGraph | None = None, payer: str = "coordinator",
           n_relays: int = 4, f: int = 1, fee: int = 1, signer: str = "hmac",
           delay: str = "fixed", delta: float = 1.0, strict: bool = True) -> Settlement:
    """Pay every node of ``work`` ``microbatches * price_per_microbatch`` over multi-hop paths.

    Args:
      work: microbatches per node (see :func:`read_work`).
      price_per_microbatch: positive int, in the smallest currency unit.
      protocol: ``"psyncpcn"`` (asynchronous, committees of 3f+1) or ``"syncpcn"``
        (synchronous, known Δ).
      seed: seeds the generated graph and every protocol run.
      graph: the channel graph to pay over (mutated: it is the ledger); default
        :func:`settlement_graph` with ``n_relays`` relays and enough capacity for every payment.
      f: committee fault bound (committees of ``3f+1`` members).
      fee: what each intermediary earns per payment it forwards (int >= 0).
      signer: ``"hmac"`` (fast) or ``"ed25519"`` (real signatures).
      delay: ``"fixed"`` (every message takes Δ) or ``"random"`` (the protocol's seeded model).
      strict: raise :class:`SettlementError` if any checker reports a violation; otherwise the
        violations are returned in ``Settlement.violations``.

    Failed payments (no route with enough free balance, or an aborted run) are reported in the
    result with ``status="failed"``; they do not raise.
    """
    check_options(price_per_microbatch=price_per_microbatch, protocol=protocol, f=f, fee=fee,
                  signer=signer, delay=delay)
    if not work:
        raise ConfigError("nothing to settle: the work log names no node")
    for node, count in work.items():
        if not isinstance(node, str) or not node:
            raise ConfigError(f"node ids must be non-empty strings, got {node!r}")
        check_amount(count, f"microbatches of {node!r}", allow_zero=True)
    if payer in work:
        raise ConfigError(f"the payer {payer!r} cannot also be paid")
    if graph is None:
        worst = sum(n * price_per_microbatch + fee * n_relays for n in work.values())
        graph = settlement_graph(list(work), payer=payer, n_relays=n_relays, seed=seed,
                                 capacity=max(1, worst))
    elif payer not in graph.parties:
        raise ConfigError(f"the payer {payer!r} is not a party of the graph")
    pay = _pay_psync if protocol == "psyncpcn" else _pay_sync
    initial_total, start = graph.total_funds(), graph.holdings()
    payments: list[NodePayment] = []
    earnings: dict[str, int] = {}
    violations: list[str] = []
    for k, (node, count) in enumerate(work.items()):
        amount = count * price_per_microbatch
        if amount == 0:
            payments.append(NodePayment(node, count, 0, "nothing_to_pay"))
            continue
        try:
            path, amounts = _route(graph, payer, node, amount, fee)
        except PaymentError as err:
            payments.append(NodePayment(node, count, amount, "failed", reason=f"no route: {err}"))
            continue
        before = graph.holdings()
        try:
            outcomes, reason, stats, latency, found = pay(
                graph, path, amount, fee, seed=_seed_for(seed, k, node), f=f, signer=signer,
                delay=delay, delta=delta)
        except PaymentError as err:  # rejected by the driver before anything changed
            payments.append(NodePayment(node, count, amount, "failed", path, len(path) - 1,
                                        reason=f"rejected: {err}"))
            continue
        after = graph.holdings()
        delta_of = {p: after[p] - before[p] for p in after}
        paid = all(o == SETTLED for o in outcomes)
        relay_fees = {u: fee for u in path[1:-1]} if paid else {}
        payment = NodePayment(node, count, amount, "paid" if paid else "failed", path,
                              len(path) - 1, relay_fees, sum(relay_fees.values()),
                              stats.total_messages, stats.total_bytes, latency,
                              delta_of[node], reason)
        payments.append(payment)
        violations += [f"payment to {node}: {v}" for v in found]
        violations += _ledger_checks(payment, delta_of, payer, amounts[0] if paid else 0)
        for u, v in relay_fees.items():
            earnings[u] = earnings.get(u, 0) + v
    end = graph.holdings()
    payer_cost = start[payer] - end[payer]
    total = sum(p.received for p in payments) + sum(earnings.values())
    if graph.total_funds() != initial_total:
        violations.append(f"conservation: channel funds {graph.total_funds()} != "
                          f"{initial_total} before settling")
    if payer_cost != total:
        violations.append(f"payer: spent {payer_cost}, but nodes and relays received {total}")
    pending = sorted(f"{cid}:{lid}" for cid, ch in graph.channels.items() for lid in ch.locks)
    if pending:
        violations.append(f"termination: locks still pending after settling: {pending}")
    result = Settlement(protocol, seed, price_per_microbatch, fee, f, 3 * f + 1, delay, payer,
                        payments, dict(sorted(earnings.items())), payer_cost, violations,
                        {"parties": len(graph.parties), "channels": len(graph.channels),
                         "relays": sorted(set(graph.parties) - set(work) - {payer})})
    if strict and violations:
        raise SettlementError("settlement broke invariants:\n  " + "\n  ".join(violations))
    return result


def _ledger_checks(p: NodePayment, change: Mapping[str, int], payer: str,
                   first_hop: int) -> list[str]:
    """The node got its amount, each relay its fee, the payer lost ``a_1``, nobody else moved."""
    out = []
    expected = {party: 0 for party in change}
    if p.status == "paid":
        expected[p.node] = p.amount
        expected[payer] = -first_hop
        expected.update(p.relay_fees)
    for party, got in change.items():
        if got != expected[party]:
            out.append(f"payment to {p.node}: {party} changed by {got}, expected "
                       f"{expected[party]}")
    return out


# -- a training run's workdir ---------------------------------------------------------------------
def settle_run(workdir: str | os.PathLike, *, overwrite: bool = False,
               **kwargs: Any) -> Settlement:
    """Settle ``<workdir>/events.jsonl`` and write ``<workdir>/settlement.json`` atomically.

    ``kwargs`` go to :func:`settle` (``price_per_microbatch`` defaults to 1). The events file is
    only read. An existing ``settlement.json`` raises ``FileExistsError`` unless ``overwrite``.
    """
    workdir = pathlib.Path(workdir)
    target = workdir / SETTLEMENT_FILE
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (CLI: "
                              "--overwrite) to replace it")
    work = read_work(workdir / EVENTS_FILE)
    kwargs.setdefault("price_per_microbatch", 1)
    result = settle(work, **kwargs)
    record = {"workdir": str(workdir), "events": EVENTS_FILE, "work": work, **result.to_dict()}
    _write_json(target, record, overwrite=overwrite)
    return result


def _write_json(path: pathlib.Path, record: dict, *, overwrite: bool) -> None:
    """Write-then-rename; without ``overwrite`` the final link fails if ``path`` appeared."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    try:
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace "
                                  "it") from None
        except OSError:  # no hard links on this filesystem
            if path.exists():
                raise FileExistsError(f"{path} already exists") from None
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m decjax.payments.settle",
        description="Pay each compute node of a training run for its microbatches.")
    parser.add_argument("--workdir", required=True, help="run folder holding events.jsonl")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="psyncpcn")
    parser.add_argument("--price", type=int, default=1, help="price per microbatch (int units)")
    parser.add_argument("--fee", type=int, default=1, help="fee per relay hop (int units)")
    parser.add_argument("--relays", type=int, default=4, help="relays in the generated graph")
    parser.add_argument("--f", type=int, default=1, help="committee fault bound (n = 3f+1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--signer", choices=("hmac", "ed25519"), default="hmac")
    parser.add_argument("--delay", choices=DELAYS, default="fixed")
    parser.add_argument("--overwrite", action="store_true", help="replace settlement.json")
    args = parser.parse_args(argv)
    try:
        result = settle_run(args.workdir, overwrite=args.overwrite, protocol=args.protocol,
                            price_per_microbatch=args.price, fee=args.fee, n_relays=args.relays,
                            f=args.f, seed=args.seed, signer=args.signer, delay=args.delay)
    except (OSError, PaymentError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result.summary())
    print(f"\nwrote {pathlib.Path(args.workdir) / SETTLEMENT_FILE}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
