"""PSyncPCN: multi-hop payments over an asynchronous network with correct channels.

Each channel ``c_i`` has a committee ``W_i`` of ``n = 3f+1`` members (at most ``f`` faulty).
Committees successively take over the obligation to finish a payment and return the decision as
quorum certificates (QCs, ``2f+1`` member signatures). There are no timeouts anywhere.

Protocol as realised here (spec §2.5; every step is a reconstruction [R] of the abstract):

1. INIT (sender-collected route consent). ``S`` fixes the route, amounts ``a_i`` and
   ``pid = H(nonce || route commitment)``, sends ``CONSENT_REQ`` to ``u_1..u_l`` and collects
   ``CONSENT``: each ``u_k`` co-signs ``COND_k`` (payee) and ``COND_{k+1}`` (payer), ``S`` signs
   ``COND_1``, and ``R`` pre-signs ``ACCEPT``. ``COND_i`` says "resolve only by DECISION-QC(pid)";
   that co-signature is the delegation to ``W_i``. Only then does ``S`` send ``INIT`` to ``W_1``.
   A silent party stalls only this stage, before anything is locked; a lying one (bad
   signature) makes ``S`` refuse to start. After INIT no party is consulted again.
2. FORWARD (leaderless vote forwarding). A member of ``W_i`` triggered by ``INIT`` (``i=1``) or
   by a LOCK-QC of ``W_{i-1}`` registers the lock (see 5) and, if it holds, signs
   ``LOCK(pid, c_i)`` and sends it to every member of ``W_{i+1}`` (``n^2`` messages per hop).
   Members of ``W_{i+1}`` assemble LOCK-QC_i themselves, so no intra-committee round and no
   collector is needed, and each message carries one signature (certificate bytes are
   ``O(l n^2 kappa)``, not ``O(l n^3 kappa)``). After voting LOCK a correct member never signs
   a decision of its own: it waits for a DECISION-QC from ``W_{i+1}`` (delegation monotonicity).
3. DECIDE. ``W_l`` signs COMMIT once its lock holds (``R``'s acceptance is pre-signed and was
   checked at registration). Abort sources, all deterministic: the first committee whose
   registration fails (invalid/forged ``COND_i`` or ``ACCEPT``, insufficient free balance,
   closed channel) signs ABORT. A correct member signs at most one decision per ``(pid, cid)``.
4. BACKWARD. Members of ``W_i`` send their DECISION vote to every member of ``W_{i-1}`` and a
   NOTIFY copy to the endpoints ``u_{i-1}, u_i``. A member of ``W_{i-1}`` that assembles a
   DECISION-QC of ``W_i`` signs the same decision for ``c_{i-1}`` and goes on.
5. Ledger (modelling choice): the committee acts as its channel's arbiter. A
   :class:`ChannelArbiter` holds the channel's registered state: the first valid registration of
   ``(pid, c_i)`` locks ``a_i`` on the ledger or records why it cannot, and every member reads
   that one result (Brick-style registration is consistent with at most ``f`` faulty members;
   the ``split`` adversary models its failure with ``f+1``). Settle/refund is applied exactly
   once, when ``2f+1`` members of ``W_i`` registered the same decision (the QC forms in the
   channel's registry). CLOSE is refused while a payment is pending on the channel.
6. "P" is read as "partially synchronous / asynchronous-safe": safety never depends on timing,
   termination is "eventually" under a fair scheduler. Unconfirmed [R].

Message count of one payment that commits (``j = l``) or aborts at hop ``j`` (exact, see
:func:`message_formula`): ``2l + n + 2(j-1) n^2 + 2 j n``. Latency: ``c_1`` resolves after
``2l + 1`` message delays (2 consent + INIT + ``l-1`` forward + ``l-1`` backward); endpoints
learn one delay later.

Examples:
    >>> from decjax.payments.graph import ChannelGraph
    >>> g = ChannelGraph()
    >>> _ = g.add_channel("s", "i", 50, 50, cid="c1"); _ = g.add_channel("i", "r", 50, 50, cid="c2")
    >>> run = run_psyncpcn(g, [PaymentSpec(("s", "i", "r"), 10, (1,))], seed=0, signer="hmac")
    >>> run.status, run.records[0].outcomes, run.check()
    (['committed'], ['settled', 'settled'], [])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from decjax.payments.channels import LOCKED, SETTLED, Channel, hop_amounts
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
from decjax.payments.committee import Behaviour, Committee, Member
from decjax.payments.crypto import (
    KeyRegistry,
    QuorumCertificate,
    SignedStatement,
    Statement,
    digest,
)
from decjax.payments.errors import (
    ConfigError,
    InsufficientBalance,
    LockError,
    NoRoute,
    PaymentError,
)
from decjax.payments.events import Node, Simulator, TraceEvent
from decjax.payments.graph import ChannelGraph
from decjax.payments.network import AsyncNetwork, Envelope, MessageStats, Scheduler

PROTO = "psync"
COMMIT, ABORT = "COMMIT", "ABORT"
DELEGATION = "resolve only by DECISION-QC(pid)"
PARTY_MODES = ("honest", "silent", "lying", "mute", "forger")


@dataclasses.dataclass(frozen=True)
class PaymentSpec:
    """A payment request: explicit party ``path``, ``value`` for the receiver, one fee per
    intermediary (default 0) and the sender's start time."""

    path: tuple[str, ...]
    value: int
    fees: tuple[int, ...] | None = None
    start: float = 0.0


@dataclasses.dataclass(frozen=True)
class Route:
    """The committed route of one payment; every statement binds ``pid`` and the commitment."""

    nonce: int
    parties: tuple[str, ...]
    cids: tuple[str, ...]
    amounts: tuple[int, ...]

    @property
    def commitment(self) -> bytes:
        return digest("psync-route", self.parties, self.cids, self.amounts)

    @property
    def pid(self) -> str:
        return digest("psync-pid", self.nonce, self.commitment).hex()[:16]

    @property
    def hops(self) -> int:
        return len(self.cids)

    def cond(self, i: int) -> Statement:
        """``COND_{i+1}``: co-signed by ``u_i`` (payer) and ``u_{i+1}`` (payee)."""
        return Statement(PROTO, "COND", self.pid, self.cids[i], i + 1, None, self.commitment,
                         (self.parties[i], self.parties[i + 1], self.amounts[i], DELEGATION))

    def accept(self) -> Statement:
        return Statement(PROTO, "ACCEPT", self.pid, self.cids[-1], self.hops, None,
                         self.commitment, (self.parties[-1], self.amounts[-1]))

    def lock(self, i: int) -> Statement:
        return Statement(PROTO, "LOCK", self.pid, self.cids[i], i + 1, None, self.commitment)

    def decision(self, i: int, decision: str) -> Statement:
        return Statement(PROTO, "DECISION", self.pid, self.cids[i], i + 1, decision,
                         self.commitment)


@dataclasses.dataclass(frozen=True)
class SignedRoute:
    """Route plus the collected consent: per hop (payer sig, payee sig), and R's acceptance."""

    route: Route
    cond_sigs: tuple[tuple[bytes, bytes], ...]
    accept_sig: bytes


@dataclasses.dataclass(frozen=True)
class ConsentRequest:
    kind = "CONSENT_REQ"
    route: Route
    depth: int


@dataclasses.dataclass(frozen=True)
class Consent:
    kind = "CONSENT"
    pid: str
    party: str
    sigs: tuple[bytes, ...]
    depth: int


@dataclasses.dataclass(frozen=True)
class Init:
    kind = "INIT"
    signed: SignedRoute
    depth: int


@dataclasses.dataclass(frozen=True)
class Vote:
    """A member's signed LOCK or DECISION statement (kind LOCK, DECISION or NOTIFY)."""

    kind: str
    signed: SignedRoute
    statement: Statement
    member: str
    sig: bytes
    depth: int


@dataclasses.dataclass(frozen=True)
class FixedDelay:
    """Scheduler delivering every message after exactly ``step`` (one message delay)."""

    step: float = 1.0

    def delay(self, env: Envelope, net: AsyncNetwork) -> float:
        return self.step


@dataclasses.dataclass
class Adversary:
    """Faults of one run.

    Attributes:
      members: ``(cid, k) -> Behaviour`` for member ``k`` of ``W_cid`` (fresh objects per run).
      parties: ``party -> mode``: ``silent`` (never answers), ``lying`` (bad consent
        signatures; a lying sender sends a bad ``COND_1``), ``mute`` (consents, then ignores
        everything), ``forger`` (sender: forges ``R``'s acceptance; others: inject forged
        votes to committees after consenting).
      split: ``cid -> member indices`` that read a conflicting registration (allowed only with
        ``>= f+1`` faulty members in that committee: registration consistency needs ``<= f``).
      replays: old envelopes re-injected; cross_replays: old votes re-sent under another
        payment or to another committee.
    """

    members: Mapping[tuple[str, int], Behaviour] = dataclasses.field(default_factory=dict)
    parties: Mapping[str, str] = dataclasses.field(default_factory=dict)
    split: Mapping[str, Sequence[int]] = dataclasses.field(default_factory=dict)
    replays: int = 0
    cross_replays: int = 0


@dataclasses.dataclass(frozen=True)
class Latency:
    """Time from the sender's start to the last hop's resolution, in message delays (causal
    depth) and in simulated time."""

    delays: int
    time: float


def message_formula(hops: int, n: int, abort_at: int | None = None) -> dict[str, int]:
    """Exact per-kind message counts of one payment with no faults: commit (``abort_at=None``)
    or abort at hop ``abort_at`` (its registration fails)."""
    j = hops if abort_at is None else abort_at
    return {"CONSENT_REQ": hops, "CONSENT": hops, "INIT": n, "LOCK": (j - 1) * n * n,
            "DECISION": (j - 1) * n * n, "NOTIFY": 2 * j * n}


def consent_statements(route: Route, party: str) -> tuple[Statement, Statement]:
    """What ``u_k`` (k >= 1) signs at INIT: ``COND_k`` as payee, then ``COND_{k+1}`` as payer
    (or, for the receiver, its acceptance)."""
    k = route.parties.index(party)
    return route.cond(k - 1), (route.cond(k) if k < route.hops else route.accept())


class _Ledger:
    """Shared run log: QCs assembled anywhere (with where and when), ledger resolutions."""

    def __init__(self, sim: Simulator, registry: KeyRegistry,
                 committees: dict[str, Committee], records: dict[str, PaymentRecord]):
        self.sim, self.registry, self.committees, self.records = sim, registry, committees, records
        self.qcs: list[tuple[float, str, QuorumCertificate]] = []
        self.resolutions: list[tuple[float, str, int, str, bool, int]] = []

    def note_qc(self, qc: QuorumCertificate, where: str) -> None:
        st = qc.statement
        self.qcs.append((self.sim.now, where, qc))
        self.sim.record("qc", where=where, pid=st.pid, cid=st.cid, phase=st.phase,
                        decision=st.decision or "")


class ChannelArbiter:
    """The registered state of one channel, kept by its committee (see module docstring, 5)."""

    def __init__(self, channel: Channel, committee: Committee, log: _Ledger,
                 split: Sequence[str] = ()):
        self.channel, self.committee, self.log = channel, committee, log
        self.split = frozenset(split)
        self.registrations: dict[str, str] = {}
        self.votes: dict[tuple[str, str], dict[str, SignedStatement]] = {}
        self.decided: dict[str, str] = {}

    def register(self, member: str, sr: SignedRoute, i: int) -> str:
        """``"ok"`` if ``a_i`` is locked for the payment, else the reason it cannot be."""
        if member in self.split:
            return "conflicting registration"
        pid = sr.route.pid
        if pid not in self.registrations:
            self.registrations[pid] = self._try_lock(sr, i)
            self.log.sim.record("register", pid=pid, cid=self.channel.cid,
                                result=self.registrations[pid])
        return self.registrations[pid]

    def _try_lock(self, sr: SignedRoute, i: int) -> str:
        route, reg = sr.route, self.log.registry
        payer, payee = route.parties[i], route.parties[i + 1]
        if route.pid not in self.log.records:
            return "unknown payment"
        if {payer, payee} != set(self.channel.parties):
            return "route does not match channel endpoints"
        sig_payer, sig_payee = sr.cond_sigs[i]
        if not (reg.verify(payer, route.cond(i), sig_payer)
                and reg.verify(payee, route.cond(i), sig_payee)):
            return "invalid COND signature"
        if i == route.hops - 1 and not reg.verify(payee, route.accept(), sr.accept_sig):
            return "invalid receiver acceptance"
        try:
            self.channel.lock(self.log.records[route.pid].lock_ids[i], payer, route.amounts[i],
                              pid=route.pid)
        except PaymentError as err:
            return str(err)
        return "ok"

    def add_vote(self, vote: SignedStatement, depth: int) -> None:
        """Record a member's decision; apply the ledger effect when the first QC forms."""
        st = vote.statement
        if not (self.committee.is_member(vote.signer) and vote.verify(self.log.registry)):
            return
        votes = self.votes.setdefault((st.pid, st.decision), {})
        votes[vote.signer] = vote
        if len(votes) != self.committee.quorum:
            return
        qc = QuorumCertificate.from_votes(votes.values())
        self.log.note_qc(qc, f"registry:{self.channel.cid}")
        if st.pid not in self.decided:
            self._apply(st.pid, st.seq - 1, st.decision, depth)

    def _apply(self, pid: str, i: int, decision: str, depth: int) -> None:
        self.decided[pid] = decision
        lock_id = self.log.records[pid].lock_ids[i]
        had_lock = self.channel.status(lock_id) == LOCKED
        if had_lock:
            (self.channel.settle if decision == COMMIT else self.channel.refund)(lock_id)
        self.log.resolutions.append((self.log.sim.now, pid, i, decision, had_lock, depth))
        self.log.sim.record("resolve", pid=pid, cid=self.channel.cid, decision=decision)

    def pending(self) -> list[str]:
        return sorted(lk.pid for lk in self.channel.locks.values() if lk.pid is not None)

    def close(self) -> dict[str, int]:
        """Close the channel; refused while a payment is pending on it."""
        if self.pending():
            raise LockError(f"cannot close channel {self.channel.cid!r}: payment(s) "
                            f"{self.pending()} pending")
        return self.channel.close()


class PsyncMember(Member):
    """A member of the committee of channel ``cid``."""

    def __init__(self, member_id: str, signer: Any, registry: KeyRegistry,
                 behaviour: Behaviour | None, *, cid: str, log: _Ledger,
                 arbiters: dict[str, ChannelArbiter]):
        super().__init__(member_id, signer, registry, behaviour)
        self.cid, self.log, self.arbiters = cid, log, arbiters
        self.phase: dict[str, str] = {}
        self.depth: dict[str, int] = {}
        self.lock_votes: dict[str, dict[str, bytes]] = {}
        self.dec_votes: dict[tuple[str, str], dict[str, bytes]] = {}

    def _hop(self, sr: SignedRoute) -> int | None:
        cids = sr.route.cids
        return cids.index(self.cid) if self.cid in cids else None

    def _committee(self, route: Route, i: int) -> Committee:
        return self.log.committees[route.cids[i]]

    def on_message(self, src: str, message: Any) -> None:
        i = self._hop(message.signed) if hasattr(message, "signed") else None
        if i is None:
            return
        pid = message.signed.route.pid
        self.depth[pid] = max(self.depth.get(pid, 0), message.depth)
        if isinstance(message, Init) and i == 0 and src == message.signed.route.parties[0]:
            self._trigger(message.signed, i)
        elif isinstance(message, Vote) and message.member == src:
            self._on_vote(message, i)

    def _valid_vote(self, vote: Vote, expected: Statement, j: int) -> bool:
        return (vote.statement == expected
                and self._committee(vote.signed.route, j).is_member(vote.member)
                and self.registry.verify(vote.member, expected, vote.sig))

    def _on_vote(self, vote: Vote, i: int) -> None:
        route = vote.signed.route
        if vote.kind == "LOCK" and i > 0 and self._valid_vote(vote, route.lock(i - 1), i - 1):
            votes = self.lock_votes.setdefault(route.pid, {})
            votes[vote.member] = vote.sig
            if len(votes) >= self._committee(route, i - 1).quorum:
                self._trigger(vote.signed, i)
        elif vote.kind == "DECISION" and i + 1 < route.hops:
            decision = vote.statement.decision
            if decision not in (COMMIT, ABORT):
                return
            if not self._valid_vote(vote, route.decision(i + 1, decision), i + 1):
                return
            votes = self.dec_votes.setdefault((route.pid, decision), {})
            votes[vote.member] = vote.sig
            if len(votes) == self._committee(route, i + 1).quorum:
                qc = QuorumCertificate(vote.statement, tuple(sorted(votes.items())))
                self.log.note_qc(qc, self.id)
                self._decide(vote.signed, i, decision)

    def _trigger(self, sr: SignedRoute, i: int) -> None:
        pid = sr.route.pid
        if pid in self.phase:
            return
        result = self.arbiters[self.cid].register(self.id, sr, i)
        if result != "ok":
            self._decide(sr, i, ABORT)
        elif i == sr.route.hops - 1:
            self._decide(sr, i, COMMIT)
        else:
            self.phase[pid] = "locked"
            targets = self._committee(sr.route, i + 1).members
            self.vote_to(sr.route.lock(i), targets, self._maker("LOCK", sr))

    def _decide(self, sr: SignedRoute, i: int, decision: str) -> None:
        route = sr.route
        if self.phase.get(route.pid) == "decided":
            return
        self.phase[route.pid] = "decided"
        st = route.decision(i, decision)
        sig = self.sign(st)
        if sig is not None:
            vote = SignedStatement(st, self.id, sig)
            self.arbiters[self.cid].add_vote(vote, self.depth.get(route.pid, 0))
        if i > 0:
            self.vote_to(st, self._committee(route, i - 1).members, self._maker("DECISION", sr))
        self.vote_to(st, [route.parties[i], route.parties[i + 1]], self._maker("NOTIFY", sr))

    def _maker(self, kind: str, sr: SignedRoute):
        depth = self.depth.get(sr.route.pid, 0) + 1
        return lambda st, member, sig: Vote(kind, sr, st, member, sig, depth)


class PsyncParty(Node):
    """A channel party: sender logic, consent, and collecting NOTIFY votes into receipts."""

    def __init__(self, party: str, signer: Any, mode: str, log: _Ledger):
        super().__init__(party)
        if mode not in PARTY_MODES:
            raise ConfigError(f"party {party!r}: unknown mode {mode!r}; allowed {PARTY_MODES}")
        self.signer, self.mode, self.log = signer, mode, log
        self.pending: dict[str, tuple[Route, dict[str, tuple[bytes, ...]]]] = {}
        self.status: dict[str, str] = {}
        self.receipts: dict[tuple[str, str], str] = {}
        self.notes: dict[tuple[str, str, str], dict[str, bytes]] = {}

    def start(self, route: Route) -> None:
        """Sender: collect consent from ``u_1..u_l`` (silent senders never start)."""
        self.status[route.pid] = "consenting"
        if self.mode == "silent":
            return
        self.pending[route.pid] = (route, {})
        for party in route.parties[1:]:
            self.send(party, ConsentRequest(route, 1))

    def on_message(self, src: str, message: Any) -> None:
        if self.mode in ("silent", "mute") and not isinstance(message, ConsentRequest):
            return
        if isinstance(message, ConsentRequest) and self.mode != "silent":
            self._consent(src, message)
        elif isinstance(message, Consent):
            self._collect(src, message)
        elif isinstance(message, Vote) and message.kind == "NOTIFY":
            self._notify(message)

    def _consent(self, src: str, req: ConsentRequest) -> None:
        route = req.route
        if src != route.parties[0] or self.id not in route.parties[1:]:
            return
        sigs = tuple(self.signer.sign(st) for st in consent_statements(route, self.id))
        if self.mode == "lying":
            sigs = tuple(bytes(64) for _ in sigs)
        self.send(src, Consent(route.pid, self.id, sigs, req.depth + 1))
        if self.mode == "forger":
            self._forge(route)

    def _forge(self, route: Route) -> None:
        """Inject forged votes: garbage signatures under real member ids."""
        k = route.parties.index(self.id)
        sr = SignedRoute(route, ((bytes(64), bytes(64)),) * route.hops, bytes(64))
        for i in range(max(0, k - 1), min(route.hops, k + 1)):
            for member in self.log.committees[route.cids[i]].members:
                st = route.decision(min(i + 1, route.hops - 1), ABORT)
                self.send(member, Vote("DECISION", sr, st, member, bytes(64), 1))

    def _collect(self, src: str, consent: Consent) -> None:
        if consent.pid not in self.pending or src != consent.party:
            return
        route, got = self.pending[consent.pid]
        stmts = consent_statements(route, src)
        if len(consent.sigs) != 2 or not all(
                self.log.registry.verify(src, st, sig) for st, sig in zip(stmts, consent.sigs,
                                                                            strict=True)):
            self.status[route.pid] = "refused"
            del self.pending[route.pid]
            self.log.sim.record("refused", pid=route.pid, party=src)
            return
        got[src] = consent.sigs
        if len(got) == route.hops:
            del self.pending[route.pid]
            self._send_init(route, got, consent.depth + 1)

    def _send_init(self, route: Route, got: dict[str, tuple[bytes, ...]], depth: int) -> None:
        parties = route.parties
        conds = []
        for i in range(route.hops):
            payer = self.signer.sign(route.cond(0)) if i == 0 else got[parties[i]][1]
            conds.append((payer, got[parties[i + 1]][0]))
        accept = got[parties[-1]][1]
        if self.mode == "forger":
            accept = bytes(64)
        if self.mode == "lying":
            conds[0] = (bytes(64), conds[0][1])
        self.status[route.pid] = "started"
        self.log.sim.record("init", pid=route.pid)
        for member in self.log.committees[route.cids[0]].members:
            self.send(member, Init(SignedRoute(route, tuple(conds), accept), depth))

    def _notify(self, vote: Vote) -> None:
        st = vote.statement
        com = self.log.committees.get(st.cid or "")
        if com is None or not com.is_member(vote.member) or st.pid is None:
            return
        if not self.log.registry.verify(vote.member, st, vote.sig):
            return
        votes = self.notes.setdefault((st.pid, st.cid, st.decision), {})
        votes[vote.member] = vote.sig
        if len(votes) == com.quorum:
            self.log.note_qc(QuorumCertificate(st, tuple(sorted(votes.items()))), self.id)
            self.receipts.setdefault((st.pid, st.cid), st.decision)


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
