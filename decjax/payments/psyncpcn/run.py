"""PSyncPCN runs: the steppable simulation, its result and checks, and the driver."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from decjax.payments.channels import LOCKED, SETTLED, hop_amounts
from decjax.payments.checkers import (
    PaymentRecord,
    Violation,
    check_atomicity,
    check_balance_security,
    check_conservation,
    check_no_equivocation,
    check_qc_uniqueness,
    check_record_consistency,
    check_termination,
)
from decjax.payments.committee import Committee
from decjax.payments.crypto import KeyRegistry, QuorumCertificate, SignedStatement
from decjax.payments.errors import (
    ConfigError,
    InsufficientBalance,
    NoRoute,
    PaymentError,
    UnknownParty,
)
from decjax.payments.events import Simulator, TraceEvent
from decjax.payments.graph import ChannelGraph
from decjax.payments.network import AsyncNetwork, Envelope, MessageStats, Scheduler
from decjax.payments.psyncpcn.adversary import Adversary
from decjax.payments.psyncpcn.messages import PaymentSpec, Route, Vote
from decjax.payments.psyncpcn.nodes import ChannelArbiter, PsyncMember, PsyncParty, _Ledger


@dataclasses.dataclass(frozen=True)
class Latency:
    """Time from the sender's start to the last hop's resolution, in message delays (causal
    depth) and in simulated time."""

    delays: int
    time: float


def message_formula(hops: int, n: int, abort_at: int | None = None) -> dict[str, int]:
    """Per-kind message counts of one payment with no faults: commit (``abort_at=None``) or
    abort at hop ``abort_at`` (its registration fails).

    Exact when messages arrive in causal order (e.g. :class:`FixedDelay`); an upper bound under
    reordering, where a member that receives the next committee's decision before its own lock
    trigger skips its ``n`` LOCK votes.
    """
    j = hops if abort_at is None else abort_at
    return {"CONSENT_REQ": hops, "CONSENT": hops, "INIT": n, "LOCK": (j - 1) * n * n,
            "DECISION": (j - 1) * n * n, "NOTIFY": 2 * j * n}


@dataclasses.dataclass
class PsyncRun:
    """Result of :func:`run_psyncpcn`; ``check()`` runs every invariant checker."""

    graph: ChannelGraph
    records: list[PaymentRecord]
    status: list[str]
    trace: list[TraceEvent]
    stats: MessageStats
    latency: dict[str, Latency]
    qcs: list[tuple[float, str, QuorumCertificate]]
    resolutions: list[tuple[float, str, int, str, bool, int]]
    committees: dict[str, Committee]
    registry: KeyRegistry
    votes: list[SignedStatement]
    correct_members: tuple[str, ...]
    honest: tuple[str, ...]
    initial_total: int
    before: dict[str, int]
    fairness: list[Envelope]

    def check(self) -> list[Violation]:
        """Conservation, balance security, atomicity, termination (quiescence), QC uniqueness,
        no equivocation by correct members, delegation monotonicity, fairness, records."""
        g, recs = self.graph, self.records
        out = check_conservation(g, self.initial_total)
        out += check_balance_security(recs, g, self.before)
        out += check_atomicity(recs, g)
        out += check_termination(recs, g, self.honest)
        out += check_qc_uniqueness([qc for _, _, qc in self.qcs], self.registry, self.committees)
        out += check_no_equivocation(self.votes, self.correct_members, self.registry)
        out += check_delegation(self)
        out += check_record_consistency(recs, g)
        out += [Violation("fairness", f"message {e.msg_id} {e.src}->{e.dst} not delivered")
                for e in self.fairness]
        return out


def check_delegation(run: PsyncRun) -> list[Violation]:
    """Delegation monotonicity: a lock on hop ``i < l`` is resolved only after a valid
    DECISION-QC of ``W_{i+1}`` with the same decision was assembled."""
    recs = {r.pid: r for r in run.records}
    seen: dict[tuple, float] = {}
    for time, _, qc in run.qcs:
        st = qc.statement
        if st.phase == "DECISION" and run.committees[st.cid].verify_qc(qc, run.registry):
            seen.setdefault((st.pid, st.cid, st.decision), time)
    out = []
    for time, pid, i, decision, had_lock, _ in run.resolutions:
        rec = recs[pid]
        if not had_lock or i + 1 >= rec.hops:
            continue
        at = seen.get((pid, rec.channels[i + 1], decision))
        if at is None or at > time:
            out.append(Violation("delegation", f"payment {pid}: W_{i + 1} released its lock "
                                 f"({decision}) without a DECISION-QC from W_{i + 2}"))
    return out


def _route(graph: ChannelGraph, spec: PaymentSpec, nonce: int) -> Route:
    """Validate a payment request (raises a :class:`PaymentError`, changes nothing)."""
    path = tuple(spec.path)
    if len(path) < 2 or len(set(path)) != len(path):
        raise NoRoute(f"path must list >= 2 distinct parties, got {list(path)}")
    chans = graph.route_channels(path)
    fees = tuple(spec.fees) if spec.fees is not None else (0,) * (len(chans) - 1)
    if len(fees) != len(chans) - 1:
        raise PaymentError(f"need {len(chans) - 1} fees for path {list(path)}, got {len(fees)}")
    amounts = hop_amounts(spec.value, fees)
    for ch, amount in zip(chans, amounts, strict=True):
        if amount > ch.capacity:
            raise InsufficientBalance(f"payment amount {amount} exceeds capacity {ch.capacity} "
                                      f"of channel {ch.cid!r}")
    return Route(nonce, path, tuple(ch.cid for ch in chans), amounts)


class PsyncSimulation:
    """A PSyncPCN run that can be stepped (``run(until)``) before ``result()``.

    Args: see :func:`run_psyncpcn`; ``n`` overrides the committee size (must be ``3f+1``).
    """

    def __init__(self, graph: ChannelGraph, payments: Sequence[PaymentSpec], *, seed: int,
                 f: int = 1, adversary: Adversary | None = None,
                 scheduler: Scheduler | None = None, signer: str = "ed25519",
                 n: int | None = None, max_delay: float = 1e6):
        adv = adversary if adversary is not None else Adversary()
        self.graph, self.adv = graph, adv
        self.sim = Simulator(seed, AsyncNetwork(scheduler, max_delay))
        nonce_rng = self.sim.rng_for("psync/nonces")
        self.routes = [_route(graph, spec, nonce_rng.getrandbits(64)) for spec in payments]
        self.specs = list(payments)
        self.registry = KeyRegistry(seed, scheme=signer)
        self.committees = {cid: self._committee(cid, f, n) for cid in graph.channels}
        self._check_adversary()
        self.honest = tuple(p for p in graph.parties if adv.parties.get(p, "honest") == "honest")
        self.records = {r.pid: PaymentRecord(r.pid, r.parties, r.cids, r.amounts,
                                             frozenset(self.honest),
                                             correct_channels=self._correct_channels())
                        for r in self.routes}
        self.log = _Ledger(self.sim, self.registry, self.committees, self.records)
        self.initial_total, self.before = graph.total_funds(), graph.holdings()
        self.arbiters: dict[str, ChannelArbiter] = {}
        self._build_nodes(f)
        self._schedule()

    def _check_adversary(self) -> None:
        """An adversary naming a party, channel or member that does not exist is a typo, not a
        fault: refuse it (as SyncPCN does) before anything runs."""
        unknown = sorted(set(self.adv.parties) - set(self.graph.parties))
        if unknown:
            raise UnknownParty(f"adversary names unknown parties {unknown}; parties are "
                               f"{sorted(self.graph.parties)}")
        channels = sorted({cid for cid, _ in self.adv.members} | set(self.adv.split))
        unknown = [cid for cid in channels if cid not in self.committees]
        if unknown:
            raise ConfigError(f"adversary names unknown channels {unknown}; channels are "
                              f"{sorted(self.committees)}")
        bad = sorted((cid, k) for cid, k in self.adv.members
                     if not 0 <= k < self.committees[cid].n)
        bad += sorted((cid, k) for cid, ks in self.adv.split.items() for k in ks
                      if not 0 <= k < self.committees[cid].n)
        if bad:
            raise ConfigError(f"adversary names committee members {bad} that do not exist: "
                              f"members are 0..{next(iter(self.committees.values())).n - 1}")

    def _committee(self, cid: str, f: int, n: int | None) -> Committee:
        size = 3 * f + 1 if n is None else n
        ids = [f"W.{cid}.m{k}" for k in range(size)]
        return Committee.bft(ids, f, name=f"W.{cid}")

    def _faulty(self, cid: str) -> list[int]:
        com = self.committees[cid]
        return [k for k in range(com.n) if (cid, k) in self.adv.members
                and self.adv.members[(cid, k)].byzantine]

    def _correct_channels(self) -> frozenset[str] | None:
        bad = {cid for cid, com in self.committees.items() if len(self._faulty(cid)) > com.f}
        return frozenset(self.committees) - bad if bad else None

    def _build_nodes(self, f: int) -> None:
        net = self.sim.network
        for cid, com in self.committees.items():
            split = [com.members[k] for k in self.adv.split.get(cid, ())]
            if split and len(self._faulty(cid)) <= com.f:
                raise ConfigError(f"split registration on {cid!r} needs >= f+1 = {com.f + 1} "
                                  f"faulty members (registration is consistent with <= f)")
            self.arbiters[cid] = ChannelArbiter(self.graph.channel(cid), com, self.log, split)
        for cid, com in self.committees.items():
            for k, m in enumerate(com.members):
                behaviour = self.adv.members.get((cid, k))
                self.sim.add_node(PsyncMember(m, self.registry.enroll(m), self.registry,
                                              behaviour, cid=cid, log=self.log,
                                              arbiters=self.arbiters))
                if behaviour is not None and behaviour.byzantine:
                    net.mark_faulty(m)
        for p in self.graph.parties:
            mode = self.adv.parties.get(p, "honest")
            self.sim.add_node(PsyncParty(p, self.registry.enroll(p), mode, self.log))
            if mode != "honest":
                net.mark_faulty(p)

    def _schedule(self) -> None:
        for route, spec in zip(self.routes, self.specs, strict=True):
            sender = self.sim.node(route.parties[0])
            self.sim.schedule(spec.start, lambda s=sender, r=route: s.start(r))
        rng = self.sim.rng_for("psync/replays")
        horizon = 4.0 * (1 + max((r.hops for r in self.routes), default=1))
        for _ in range(self.adv.replays):
            self.sim.schedule(rng.uniform(0, horizon), lambda: self._replay(rng))
        for _ in range(self.adv.cross_replays):
            self.sim.schedule(rng.uniform(0, horizon), lambda: self._cross_replay(rng))

    def _replay(self, rng: Any) -> None:
        history = self.sim.network.history
        if history:
            self.sim.network.replay(rng.randrange(len(history)), rng.uniform(0, 2))

    def _cross_replay(self, rng: Any) -> None:
        """Re-send an old vote bound to another payment's route, or to another committee."""
        old = [e for e in self.sim.network.history if isinstance(e.message, Vote)]
        if not old:
            return
        env = old[rng.randrange(len(old))]
        other = self.routes[rng.randrange(len(self.routes))]
        msg = env.message
        if other.pid != msg.signed.route.pid:
            msg = dataclasses.replace(msg, signed=dataclasses.replace(msg.signed, route=other))
        coms = list(self.committees.values())
        dst = rng.choice(coms[rng.randrange(len(coms))].members)
        self.sim.record("inject", of=env.msg_id, dst=dst)
        self.sim.schedule(rng.uniform(0, 2), lambda: self.sim.node(dst).receive(env.src, msg))

    def run(self, until: float | None = None) -> None:
        self.sim.run(until=until, max_events=5_000_000)

    def close_channel(self, cid: str) -> dict[str, int]:
        """CLOSE through the committee: refused while a payment is pending on ``cid``."""
        return self.arbiters[cid].close()

    def result(self) -> PsyncRun:
        records = [self.records[r.pid] for r in self.routes]
        status = []
        for rec, route in zip(records, self.routes, strict=True):
            rec.outcomes = rec.observed_outcomes(self.graph)
            status.append(self._status(rec, route))
        net = self.sim.network
        votes = [SignedStatement(e.message.statement, e.message.member, e.message.sig)
                 for e in net.history if isinstance(e.message, Vote)]
        votes += [v for a in self.arbiters.values() for vs in a.votes.values() for v in vs.values()]
        correct = tuple(m for cid, com in self.committees.items() for k, m in enumerate(com.members)
                        if k not in self._faulty(cid))
        return PsyncRun(self.graph, records, status, self.sim.trace, net.stats.copy(),
                        self._latency(), list(self.log.qcs), list(self.log.resolutions),
                        self.committees, self.registry, votes, correct,
                        self.honest, self.initial_total,
                        self.before, net.fairness_violations())

    def _status(self, rec: PaymentRecord, route: Route) -> str:
        sender = self.sim.node(route.parties[0])
        if sender.status.get(route.pid) in ("consenting", "refused"):
            return "not_started" if sender.status[route.pid] == "consenting" else "refused"
        if LOCKED in rec.outcomes:
            return "pending"
        if all(o == SETTLED for o in rec.outcomes):
            return "committed"
        return "aborted" if SETTLED not in rec.outcomes else "inconsistent"

    def _latency(self) -> dict[str, Latency]:
        start = {r.pid: s.start for r, s in zip(self.routes, self.specs, strict=True)}
        out: dict[str, Latency] = {}
        for time, pid, _, _, _, depth in self.log.resolutions:
            prev = out.get(pid, Latency(0, 0.0))
            out[pid] = Latency(max(prev.delays, depth), max(prev.time, time - start[pid]))
        return out


def run_psyncpcn(graph: ChannelGraph, payments: Sequence[PaymentSpec], *, seed: int, f: int = 1,
                 adversary: Adversary | None = None, scheduler: Scheduler | None = None,
                 signer: str = "ed25519", n: int | None = None) -> PsyncRun:
    """Run PSyncPCN payments on ``graph`` (mutated: it is the ledger) to quiescence.

    Bad input (unknown party, closed channel, amount above capacity, ``n != 3f+1``) raises a
    :class:`PaymentError` before anything changes. Same seed, same trace.
    """
    simulation = PsyncSimulation(graph, payments, seed=seed, f=f, adversary=adversary,
                                 scheduler=scheduler, signer=signer, n=n)
    simulation.run()
    return simulation.result()
