"""SyncPCN: multi-hop payments over committee-guarded channels in a synchronous network.

A faithful implementation of the spec's reconstruction (``specs/payments.md`` §2.4); the paper's
own algorithm was not available, so every step below is [R]. In particular these rest on
reconstructions, not on the paper: the thresholds (committee size ``n``, fault bound ``f``, ACK
quorum ``q_s``, claim/verdict quorum ``q_c``; defaults ``n = 3f+1``, ``q_s = q_c = 2f+1``), the
per-hop slack ``δ >= 3Δ + proc`` and the dispute lead ``δ_d``, the message names (INVOICE, ADD,
FULFILL, COSIGN, REGISTER, ACK, CLAIM, CONCEDE, REFUND, VERDICT), and the privacy mechanism
(AMHL-style per-hop locks and a Sphinx-like onion, :mod:`decjax.payments.syncpcn_privacy`).

Protocol, per hop ``c_i = (u_{i-1}, u_i)`` with committee ``W_i``:

* SETUP: the receiver signs ``INVOICE(tag, g^x, v)``; the sender derives per-hop conditions,
  amounts ``a_i = a_{i+1} + fee(u_i)``, deadlines ``T_l = t0 + τ_R``, ``T_i = T_{i+1} + δ``.
* LOCK: ``u_{i-1} -> u_i: ADD`` with its signature on the new state; ``u_i`` checks fee, slack
  and onion, co-signs (``COSIGN``), ``REGISTER`` s ``(cid, seq, H(state))`` with every member of
  ``W_i`` and forwards only after ``q_s`` ``ACK`` s (Brick-style: members keep the max seq).
* UNLOCK: ``u_i -> u_{i-1}: FULFILL(x_i)``; the payer co-signs the settled state, the payee
  registers it, the payer derives ``x_{i-1}`` and repeats upstream.
* DISPUTE: if the payer has not co-signed by ``T_i - δ_d``, the payee sends ``CLAIM`` (latest
  co-signed state, its opening, ``x_i``) to all of ``W_i``; a member logs SETTLED when
  ``now < T_i``, the preimage matches and nothing else is logged, and
  sends a signed ``VERDICT`` to both endpoints (the payer's copy pushes ``x_i`` upstream). A
  settling dispute may show an older co-signed state holding the lock (concurrent updates may
  race it; settling never conflicts with a newer state), a REFUND must show the latest. At
  ``T_i + Δ`` a pending lock's payer sends ``CONCEDE`` (it learnt ``x_i``: settle) or ``REFUND``;
  members sign REFUNDED at ``now >= T_i`` (payee requests: ``T_i + 3Δ``) if nothing else is
  logged. ``q_c`` matching verdicts resolve the ledger lock. CONCEDE is an addition [R]: it
  resolves locks left split by a claim sent just before ``T_i`` (spec §6.3 timing attack).
* CLOSE: cooperative, or unilateral via :func:`~decjax.payments.registration.resolve_close`
  (max registered seq, stale member claims give fraud proofs), re-applying verdict resolutions.

Modelling choices (also [R]): both endpoints share one :class:`ChannelSession` (their copies of
the channel) and serialize updates, a proposal unanswered within Δ is dropped; the ledger
(:class:`~decjax.payments.channels.Channel`) is the agreed state, so a co-signature is the
counterparty applying the update; discrete-log locks are checked by parties and members, not by
the ledger (its ``hashlock`` is None in private mode); the payee-side REFUND lag ``3Δ``, the
REFUND retry on a newer state, and payer CONCEDE are additions to the spec's steps.

Optimistic cost: ``1 + 2l(k_u + 2n)`` messages with ``k_u = 2`` (see :func:`optimistic_messages`),
latency ``(4l + 1)Δ`` when every delay is exactly Δ.

Examples:
    >>> from decjax.payments.graph import ChannelGraph
    >>> g = ChannelGraph()
    >>> _ = g.add_channel("s", "i", 50, 50); _ = g.add_channel("i", "r", 50, 50)
    >>> run = run_syncpcn(g, [("s", "r", 10)], seed=0, signer="hmac")
    >>> run.records[0].outcomes, run.violations()
    (['settled', 'settled'], [])
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from decjax.payments.channels import LOCKED, REFUNDED, SETTLED, Channel, check_amount, hop_amounts
from decjax.payments.checkers import (
    PaymentRecord,
    Violation,
    check_atomicity,
    check_balance_security,
    check_channel_safety,
    check_conservation,
    check_record_consistency,
    check_termination,
)
from decjax.payments.committee import Behaviour, Committee, Member
from decjax.payments.crypto import KeyRegistry, SignedStatement, Statement, digest
from decjax.payments.errors import (
    ConfigError,
    InsufficientBalance,
    LockError,
    NoRoute,
    PaymentError,
    UnknownParty,
)
from decjax.payments.events import Node, Simulator
from decjax.payments.graph import ChannelGraph
from decjax.payments.network import MessageStats, SyncNetwork
from decjax.payments.registration import (
    BRICK,
    CloseDecision,
    FraudProof,
    find_fraud,
    resolve_close,
    state_statement,
)
from decjax.payments.syncpcn_privacy import (
    ID_BYTES,
    MAX_HOPS,
    HopPayload,
    OnionKeys,
    PerHopLocks,
    SingleHashLock,
    build_onion,
    check_view_privacy,
    lock_id_for,
    peel_onion,
)

PROTOCOL = "syncpcn"


@dataclasses.dataclass(frozen=True)
class SyncParams:
    """Protocol parameters (spec §3.1). ``None`` means the documented default.

    Attributes:
      delta: Δ, the known delay bound. proc: local processing bound.
      hop_slack: δ >= 3Δ + proc (default 3Δ + proc). dispute_lead: δ_d, default the middle of
        the allowed range ``(Δ + proc, δ - Δ - proc]``. tau_r: τ_R, default ``3l(Δ + proc) + δ_d
        + Δ``. fee: fee per intermediary (int or party -> int). n, ack_quorum, claim_quorum:
        committee size and quorums (defaults 3f+1, 2f+1, 2f+1). private: per-hop locks (else one
        hash lock on every hop).
    """

    delta: float = 1.0
    proc: float = 0.0
    hop_slack: float | None = None
    dispute_lead: float | None = None
    tau_r: float | None = None
    fee: int | Mapping[str, int] = 1
    n: int | None = None
    ack_quorum: int | None = None
    claim_quorum: int | None = None
    private: bool = True

    def __post_init__(self) -> None:
        if not (self.delta > 0 and math.isfinite(self.delta)) or not self.proc >= 0:
            raise ConfigError(f"need Δ > 0 and proc >= 0, got Δ={self.delta}, proc={self.proc}")
        need = 3 * self.delta + self.proc
        if self.slack < need - 1e-12:
            raise ConfigError(f"hop slack δ={self.slack} must be >= 3Δ + proc = {need}")
        lo, hi = self.delta + self.proc, self.slack - self.delta - self.proc
        if not lo < self.lead <= hi:
            raise ConfigError(f"dispute lead δ_d={self.lead} must lie in (Δ + proc, δ - Δ - "
                              f"proc] = ({lo}, {hi}]")

    @property
    def slack(self) -> float:
        return 3 * self.delta + self.proc if self.hop_slack is None else float(self.hop_slack)

    @property
    def lead(self) -> float:
        if self.dispute_lead is not None:
            return float(self.dispute_lead)
        return (self.delta + self.proc + self.slack - self.delta - self.proc) / 2

    def receiver_slack(self, hops: int) -> float:
        if self.tau_r is not None:
            return float(self.tau_r)
        return 3 * hops * (self.delta + self.proc) + self.lead + self.delta

    def fee_of(self, party: str) -> int:
        return self.fee.get(party, 0) if isinstance(self.fee, Mapping) else self.fee

    def thresholds(self, f: int) -> tuple[int, int, int]:
        """``(n, q_s, q_c)`` for fault bound ``f``, validated (safety needs ``n >= 3f+1``)."""
        n = 3 * f + 1 if self.n is None else self.n
        q_s = 2 * f + 1 if self.ack_quorum is None else self.ack_quorum
        q_c = 2 * f + 1 if self.claim_quorum is None else self.claim_quorum
        if not (isinstance(f, int) and f >= 0 and n >= 3 * f + 1):
            raise ConfigError(f"committee size n={n} not allowed for f={f}: need n >= 3f+1")
        if not (2 * q_c - n > f and q_c <= n - f and q_s <= n - f and q_s + q_c - n > f):
            raise ConfigError(f"quorums q_s={q_s}, q_c={q_c} not allowed for n={n}, f={f}: need "
                              "q_c, q_s <= n-f, 2q_c-n > f and q_s+q_c-n > f")
        return n, q_s, q_c

    def scheme(self) -> PerHopLocks | SingleHashLock:
        return PerHopLocks() if self.private else SingleHashLock()


def optimistic_messages(hops: int, n: int) -> int:
    """INVOICE + per hop: ADD, COSIGN, n REGISTER, n ACK for the lock, the same for FULFILL."""
    return 1 + 2 * hops * (2 + 2 * n)


# -- messages --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Invoice:
    kind = "INVOICE"
    tag: bytes
    cond: bytes
    value: int
    sig: bytes


@dataclasses.dataclass(frozen=True)
class Add:
    kind = "ADD"
    cid: str
    lock_id: str
    amount: int
    deadline: float
    cond: bytes
    onion: bytes
    seq: int
    state_hash: bytes
    sig: bytes


@dataclasses.dataclass(frozen=True)
class Fulfill:
    kind = "FULFILL"
    cid: str
    lock_id: str
    preimage: bytes
    seq: int
    state_hash: bytes
    sig: bytes


@dataclasses.dataclass(frozen=True)
class Cosign:
    kind = "COSIGN"
    cid: str
    seq: int
    state_hash: bytes
    sig: bytes


@dataclasses.dataclass(frozen=True)
class Register:
    kind = "REGISTER"
    cid: str
    seq: int
    state_hash: bytes
    sig_a: bytes
    sig_b: bytes


@dataclasses.dataclass(frozen=True)
class Ack:
    kind = "ACK"
    vote: SignedStatement


@dataclasses.dataclass(frozen=True)
class CoSigned:
    """A co-signed channel state and its opening ``(channel.state(), lock conditions)``."""

    seq: int
    state_hash: bytes
    sig_a: bytes
    sig_b: bytes
    opening: tuple


@dataclasses.dataclass(frozen=True)
class Dispute:
    kind: str  # CLAIM | CONCEDE | REFUND
    cid: str
    lock_id: str
    preimage: bytes
    state: CoSigned


@dataclasses.dataclass(frozen=True)
class Verdict:
    kind = "VERDICT"
    vote: SignedStatement
    preimage: bytes


def verdict_statement(cid: str, lock_id: str, decision: str) -> Statement:
    return Statement(PROTOCOL, "VERDICT", pid=lock_id, cid=cid, decision=decision)


def opening_digest(opening: tuple) -> bytes:
    return digest(PROTOCOL, "state", opening)


# -- channel sessions ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LockOp:
    lock_id: str
    payer: str
    amount: int
    deadline: float
    cond: bytes


@dataclasses.dataclass(frozen=True)
class SettleOp:
    lock_id: str
    preimage: bytes


class ChannelSession:
    """Both endpoints' copy of one channel: co-signed states, lock conditions, update queue.

    Updates are serialized (one proposal in flight, as in Lightning's commitment dance); a
    proposal not processed within Δ is abandoned.
    """

    def __init__(self, run: SyncRun, ch: Channel, committee: Committee):
        self.run, self.ch, self.committee = run, ch, committee
        self.conds: dict[str, bytes] = {}
        self.cosigned: dict[int, CoSigned] = {}
        self.latest: CoSigned | None = None
        self.busy: tuple | None = None
        self.queue: deque[tuple[Party, Any]] = deque()

    def opening(self, ch: Channel, conds: Mapping[str, bytes]) -> tuple:
        return (ch.state(), tuple(sorted((k, conds[k]) for k in ch.locks)))

    def _apply(self, ch: Channel, conds: dict[str, bytes], op: Any) -> None:
        if isinstance(op, LockOp):
            ch.lock(op.lock_id, op.payer, op.amount, hashlock=self.run.scheme.ledger_hashlock(
                op.cond), deadline=op.deadline)
            conds[op.lock_id] = op.cond
        else:
            ch.settle(op.lock_id, op.preimage)

    def preview(self, op: Any) -> tuple[int, bytes] | None:
        """``(seq, H(state))`` after ``op``, or None if ``op`` does not apply."""
        c = dataclasses.replace(self.ch, balances=dict(self.ch.balances), locks=dict(self.ch.locks),
                                resolved=dict(self.ch.resolved), history=[])
        conds = dict(self.conds)
        try:
            self._apply(c, conds, op)
        except PaymentError:
            return None
        return c.seq, opening_digest(self.opening(c, conds))

    def apply(self, op: Any, sigs: Mapping[str, bytes]) -> CoSigned:
        self._apply(self.ch, self.conds, op)
        opening = self.opening(self.ch, self.conds)
        st = CoSigned(self.ch.seq, opening_digest(opening), sigs[self.ch.a], sigs[self.ch.b],
                      opening)
        self.cosigned[st.seq] = self.latest = st
        return st

    def submit(self, party: Party, op: Any) -> None:
        self.queue.append((party, op))
        self.pump()

    def pump(self) -> None:
        while self.busy is None and self.queue:
            party, op = self.queue.popleft()
            party.send_proposal(self, op)

    def release(self, token: tuple) -> None:
        if self.busy == token:
            self.busy = None
            self.run.sim.schedule(0.0, self.pump)


# -- adversary strategies --------------------------------------------------------------------------
class PartyBehaviour:
    """Strategy of a channel party; the base class is honest. Hooks return what the party does."""

    byzantine = False

    def sends_invoice(self, node: Party) -> bool:
        return True

    def forwards(self, node: Party, lock_id: str) -> bool:
        """Intermediary: forward the lock downstream; receiver: fulfil it."""
        return True

    def cosigns_fulfill(self, node: Party, lock_id: str) -> bool:
        return True

    def fulfils_upstream(self, node: Party, lock_id: str) -> bool:
        return True

    def claim_time(self, node: Party, deadline: float) -> float | None:
        return max(node.now, deadline - node.run.params.lead)

    def acts_on_expiry(self, node: Party) -> bool:
        return True

    def cheats_refund(self, node: Party) -> bool:
        return False

    def on_learn(self, node: Party, lock_id: str, preimage: bytes) -> bool:
        """False stops the normal reaction to learning an incoming lock's preimage."""
        return True

    def tamper(self, node: Party, amounts: list[int], deadlines: list[float]) -> None:
        """Sender: edit the amounts/deadlines put in the ADD and onion (in place)."""

    def tamper_onion(self, node: Party, onion: bytes) -> bytes:
        return onion


class Honest(PartyBehaviour):
    pass


class Silent(PartyBehaviour):
    """Does nothing after joining (silent receiver / intermediary)."""

    byzantine = True

    def sends_invoice(self, node: Party) -> bool:
        return False

    def forwards(self, node: Party, lock_id: str) -> bool:
        return False

    def cosigns_fulfill(self, node: Party, lock_id: str) -> bool:
        return False

    def fulfils_upstream(self, node: Party, lock_id: str) -> bool:
        return False

    def claim_time(self, node: Party, deadline: float) -> float | None:
        return None

    def acts_on_expiry(self, node: Party) -> bool:
        return False


class Griefer(PartyBehaviour):
    """Accepts locks and never forwards or fulfils them (liquidity griefing)."""

    byzantine = True

    def forwards(self, node: Party, lock_id: str) -> bool:
        return False


class Stingy(PartyBehaviour):
    """Never co-signs a FULFILL (forces the dispute path), otherwise rational."""

    byzantine = True

    def cosigns_fulfill(self, node: Party, lock_id: str) -> bool:
        return False


class LateClaimer(PartyBehaviour):
    """Never fulfils cooperatively; claims at ``T_i - eps`` (eps in units of Δ)."""

    byzantine = True

    def __init__(self, eps: float = 0.3):
        self.eps = eps

    def fulfils_upstream(self, node: Party, lock_id: str) -> bool:
        return False

    def claim_time(self, node: Party, deadline: float) -> float | None:
        return max(node.now, deadline - self.eps * node.run.params.delta)


class RefundCheater(Stingy):
    """Never co-signs a FULFILL and asks for a refund at ``T_i`` whatever happened."""

    def cheats_refund(self, node: Party) -> bool:
        return True


class BadOnion(PartyBehaviour):
    byzantine = True

    def tamper_onion(self, node: Party, onion: bytes) -> bytes:
        return onion[:40] + bytes([onion[40] ^ 1]) + onion[41:]


class ShortDeadlines(PartyBehaviour):
    """Sender gives the first hop less than δ of slack."""

    byzantine = True

    def tamper(self, node: Party, amounts: list[int], deadlines: list[float]) -> None:
        if len(deadlines) > 1:
            deadlines[0] = deadlines[1] + node.run.params.slack / 2


class NoFee(PartyBehaviour):
    """Sender pays the first intermediary no fee."""

    byzantine = True

    def tamper(self, node: Party, amounts: list[int], deadlines: list[float]) -> None:
        if len(amounts) > 1:
            amounts[0] = amounts[1]


class WormholeEnd(PartyBehaviour):
    """Colluder ``u_j``: passes its preimage straight to ``start`` instead of fulfilling."""

    byzantine = True

    def __init__(self, start: str):
        self.start = start

    def fulfils_upstream(self, node: Party, lock_id: str) -> bool:
        return False

    def claim_time(self, node: Party, deadline: float) -> float | None:
        return None

    def on_learn(self, node: Party, lock_id: str, preimage: bytes) -> bool:
        start = node.run.parties[self.start]
        node.run.sim.schedule(node.run.params.delta, lambda: start.wormhole(preimage))
        return False


class WormholeStart(PartyBehaviour):
    """Colluder ``u_i``: otherwise honest; receives the wormhole preimage."""

    byzantine = True


class Colluding(Behaviour):
    """Byzantine member: ``claims``/``refunds`` True signs every such dispute (late or
    conflicting), False refuses it, None follows the protocol; ``stale_close`` claims its oldest
    registered state at close."""

    byzantine = True

    def __init__(self, claims: bool | None = True, refunds: bool | None = True,
                 stale_close: bool = False):
        self.claims, self.refunds, self.stale_close = claims, refunds, stale_close

    def override(self, kind: str) -> bool | None:
        return self.refunds if kind == "REFUND" else self.claims

    def statements_for(self, member: Member, statement: Statement,
                       recipients: Sequence[str]) -> list[tuple[str, Statement]]:
        return [(r, statement) for r in recipients]


def flip_verdict(statement: Statement) -> Statement:
    """SETTLED <-> REFUNDED; other statements get a wrong state hash (for Equivocating)."""
    flips = {"SETTLED": "REFUNDED", "REFUNDED": "SETTLED"}
    if statement.decision in flips:
        return statement.replace(decision=flips[statement.decision])
    return statement.replace(state_hash=digest("equivocation", statement.state_hash))


@dataclasses.dataclass
class Adversary:
    """Who deviates: party strategies, member behaviours (by member id), a network delay
    choice (e.g. always Δ), and hooks ``hook(run)`` called before the run starts."""

    parties: Mapping[str, PartyBehaviour] = dataclasses.field(default_factory=dict)
    members: Mapping[str, Behaviour] = dataclasses.field(default_factory=dict)
    delay: Callable[[Any], float] | None = None
    hooks: Sequence[Callable[[SyncRun], None]] = ()


def committee_name(cid: str) -> str:
    return f"W[{cid}]"


def member_id(cid: str, k: int) -> str:
    return f"{committee_name(cid)}.m{k}"


def invoice_tag(pid: str) -> bytes:
    return digest(PROTOCOL, "invoice", pid)[:16]


# -- parties ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class InLock:
    """Payee side of a lock: what the ADD and the peeled onion layer said."""

    cid: str
    cond: bytes
    deadline: float
    payload: HopPayload
    onion: bytes | None


@dataclasses.dataclass
class OutLock:
    """Payer side of a lock; ``in_lock`` is the incoming lock it pays for (None: sender)."""

    cid: str
    cond: bytes
    deadline: float
    in_lock: tuple[str, str] | None


@dataclasses.dataclass(frozen=True)
class Plan:
    pid: str
    path: tuple[str, ...]
    value: int
    amounts: tuple[int, ...]
    tag: bytes


class Party(Node):
    """A channel party (sender, intermediary or receiver, by payment); locks keyed ``(cid, id)``."""

    def __init__(self, party: str, run: SyncRun, signer: Any, behaviour: PartyBehaviour):
        super().__init__(party)
        self.run, self.signer, self.behaviour = run, signer, behaviour
        self.rng: Any = None
        self.inc: dict[tuple[str, str], InLock] = {}
        self.out: dict[tuple[str, str], OutLock] = {}
        self.known: dict[tuple[str, str], bytes] = {}
        self.learned_at: dict[tuple[str, str], float] = {}
        self.invoices: dict[bytes, tuple[bytes, int]] = {}
        self.plans: dict[bytes, Plan] = {}
        self.waiting: dict[tuple[str, int], tuple[set[str], Callable[[], None]]] = {}
        self.tallies: dict[tuple, dict[str, SignedStatement]] = {}
        self.settling: set[tuple[str, int]] = set()
        self.done: set[tuple] = set()
        self.view: list[Any] = []
        self.rejected = 0

    # -- plumbing ------------------------------------------------------------------------------
    def on_message(self, src: str, message: Any) -> None:
        self.view += [src, message]
        handler = {Invoice: self._on_invoice, Add: self._on_add, Fulfill: self._on_fulfill,
                   Cosign: self._on_cosign, Ack: self._on_ack, Verdict: self._on_verdict}
        fn = handler.get(type(message))
        if fn is None or fn(src, message) is False:
            self.rejected += 1

    def _session(self, cid: str, peer: str | None = None) -> ChannelSession | None:
        sess = self.run.sessions.get(cid)
        if sess is None or self.id not in sess.ch.parties:
            return None
        return sess if peer is None or peer == sess.ch.counterparty(self.id) else None

    def _once(self, *key: Any) -> bool:
        if key in self.done:
            return False
        self.done.add(key)
        return True

    def propose(self, cid: str, op: Any, onion: bytes = b"") -> None:
        self.run.sessions[cid].submit(self, (op, onion))

    def send_proposal(self, sess: ChannelSession, item: tuple[Any, bytes]) -> None:
        op, onion = item
        pv = sess.preview(op)
        if pv is None:
            self.rejected += 1
            return
        seq, h = pv
        cid = sess.ch.cid
        sig = self.signer.sign(state_statement(cid, seq, h))
        sess.busy = token = (seq, h)
        if isinstance(op, LockOp):
            msg: Any = Add(cid, op.lock_id, op.amount, op.deadline, op.cond, onion, seq, h, sig)
            self._arm((cid, op.lock_id), op.deadline, payer=True)
        else:
            msg = Fulfill(cid, op.lock_id, op.preimage, seq, h, sig)
            self.settling.add((cid, seq))
        self.send(sess.ch.counterparty(self.id), msg)
        self.run.sim.schedule(self.run.params.delta, lambda: sess.release(token))

    def _cosign(self, sess: ChannelSession, src: str, op: Any, m: Any) -> CoSigned | None:
        """Check the proposer's signature on the previewed state, apply it, send COSIGN."""
        cid = sess.ch.cid
        st = state_statement(cid, m.seq, m.state_hash)
        if sess.preview(op) != (m.seq, m.state_hash) or not self.run.registry.verify(
                src, st, m.sig):
            return None
        mine = self.signer.sign(st)
        cosigned = sess.apply(op, {src: m.sig, self.id: mine})
        self.send(src, Cosign(cid, m.seq, m.state_hash, mine))
        return cosigned

    def _register(self, sess: ChannelSession, seq: int, then: Callable[[], None] | None) -> None:
        st, cid = sess.cosigned[seq], sess.ch.cid
        if then is not None:
            self.waiting[(cid, seq)] = (set(), then)
        for member in sess.committee.members:
            self.send(member, Register(cid, seq, st.state_hash, st.sig_a, st.sig_b))

    # -- setup ---------------------------------------------------------------------------------
    def send_invoice(self, pid: str, sender: str, value: int) -> None:
        if not self.behaviour.sends_invoice(self):
            return
        tag = invoice_tag(pid)
        x, cond = self.run.scheme.new_secret(self.rng)
        self.invoices[tag] = (x, value)
        st = Statement(PROTOCOL, "INVOICE", pid=tag, state_hash=cond, extra=(value,))
        self.send(sender, Invoice(tag, cond, value, self.signer.sign(st)))

    def _on_invoice(self, src: str, m: Invoice) -> bool:
        plan = self.plans.get(m.tag)
        st = Statement(PROTOCOL, "INVOICE", pid=m.tag, state_hash=m.cond, extra=(m.value,))
        if plan is None or src != plan.path[-1] or m.value != plan.value or \
                not self.run.registry.verify(src, st, m.sig):
            return False
        del self.plans[m.tag]
        run, p, hops = self.run, self.run.params, len(plan.path) - 1
        amounts = list(plan.amounts)
        deadlines = [self.now + p.receiver_slack(hops)] * hops
        for i in reversed(range(hops - 1)):
            deadlines[i] = deadlines[i + 1] + p.slack
        conds, tweaks = run.scheme.setup(m.cond, hops, self.rng)
        run.register_payment(plan.pid, conds, deadlines)
        self.behaviour.tamper(self, amounts, deadlines)
        payloads = [HopPayload(plan.path[j + 2] if j + 1 < hops else None,
                               amounts[min(j + 1, hops - 1)], deadlines[min(j + 1, hops - 1)],
                               tweaks[j], plan.tag if j + 1 == hops else b"")
                    for j in range(hops)]
        onion = build_onion(plan.path[1:], payloads, run.keys, self.rng)
        cid = run.payments[plan.pid].channels[0]
        key = (cid, lock_id_for(conds[0]))
        self.out[key] = OutLock(cid, conds[0], deadlines[0], None)
        self.propose(cid, LockOp(key[1], self.id, amounts[0], deadlines[0], conds[0]),
                     self.behaviour.tamper_onion(self, onion))
        return True

    # -- lock ----------------------------------------------------------------------------------
    def _on_add(self, src: str, m: Add) -> bool:
        sess = self._session(m.cid, src)
        if sess is None or sess.busy != (m.seq, m.state_hash):
            return False
        try:
            return self._accept_add(sess, src, m)
        finally:
            sess.release((m.seq, m.state_hash))

    def _check_payload(self, m: Add, payload: HopPayload) -> bool:
        run = self.run
        if payload.next_hop is None:
            inv = self.invoices.get(payload.tag)
            return (inv is not None and payload.amount == inv[1] <= m.amount
                    and m.deadline >= payload.deadline and run.scheme.verify(
                        run.scheme.receiver_preimage(inv[0], payload.tweak), m.cond))
        try:
            nxt = run.graph.between(self.id, payload.next_hop)
        except PaymentError:
            return False
        return (nxt.is_open and payload.amount > 0 and payload.deadline > self.now
                and m.amount >= payload.amount + run.params.fee_of(self.id)
                and m.deadline - payload.deadline >= run.params.slack - 1e-9)

    def _accept_add(self, sess: ChannelSession, src: str, m: Add) -> bool:
        if m.lock_id != lock_id_for(m.cond) or m.deadline <= self.now:
            return False
        try:
            payload, inner = peel_onion(m.onion, self.run.keys.private(self.id))
        except PaymentError:
            return False
        if not self._check_payload(m, payload):
            return False
        op = LockOp(m.lock_id, src, m.amount, m.deadline, m.cond)
        st = self._cosign(sess, src, op, m)
        if st is None:
            return False
        key = (m.cid, m.lock_id)
        self.run.on_locked(m.cid, m.lock_id, op)
        self.inc[key] = InLock(m.cid, m.cond, m.deadline, payload, inner)
        self.view.append(payload)
        self._arm(key, m.deadline, payer=False)
        self._register(sess, st.seq, lambda: self._locked(key))
        return True

    def _locked(self, key: tuple[str, str]) -> None:
        """``q_s`` ACKs on the locked state: forward (intermediary) or fulfil (receiver)."""
        info, run = self.inc[key], self.run
        if not self.behaviour.forwards(self, key[1]):
            return
        if info.payload.next_hop is None:
            x = self.invoices[info.payload.tag][0]
            self._learn(key, run.scheme.receiver_preimage(x, info.payload.tweak))
            return
        cond = run.scheme.downstream_cond(info.cond, info.payload.tweak)
        cid = run.graph.between(self.id, info.payload.next_hop).cid
        out = (cid, lock_id_for(cond))
        if self._once("forward", key):
            self.out[out] = OutLock(cid, cond, info.payload.deadline, key)
            self.propose(cid, LockOp(out[1], self.id, info.payload.amount,
                                     info.payload.deadline, cond), info.onion or b"")

    def _on_cosign(self, src: str, m: Cosign) -> bool:
        sess = self._session(m.cid, src)
        if sess is None or (m.cid, m.seq) not in self.settling:
            return sess is not None
        self.settling.discard((m.cid, m.seq))
        got = sess.cosigned.get(m.seq)
        if got is not None and got.state_hash == m.state_hash:
            self._register(sess, m.seq, None)
        return True

    def _on_ack(self, src: str, m: Ack) -> bool:
        v, st = m.vote, m.vote.statement
        sess = self._session(st.cid or "")
        if sess is None or (st.protocol, st.phase) != (BRICK, "ACK") or v.signer != src or \
                not sess.committee.is_member(src) or not v.verify(self.run.registry):
            return False
        for key in sorted(self.waiting):
            got = sess.cosigned.get(st.seq)
            if key[0] != st.cid or st.seq < key[1] or got is None or \
                    got.state_hash != st.state_hash:
                continue
            ackers, then = self.waiting[key]
            ackers.add(src)
            if len(ackers) >= self.run.quorums[1]:
                del self.waiting[key]
                then()
        return True

    # -- unlock --------------------------------------------------------------------------------
    def _learn(self, key: tuple[str, str], preimage: bytes) -> None:
        """Preimage of an incoming lock: fulfil upstream and arm the claim at ``T - δ_d``."""
        if key in self.known:
            return
        self.known[key], self.learned_at[key] = preimage, self.now
        if not self.behaviour.on_learn(self, key[1], preimage):
            return
        info = self.inc[key]
        if self.behaviour.fulfils_upstream(self, key[1]):
            self.propose(key[0], SettleOp(key[1], preimage))
        when = self.behaviour.claim_time(self, info.deadline)
        if when is not None:
            self.run.sim.schedule_at(when, lambda: self._dispute("CLAIM", key, preimage))

    def _learn_out(self, key: tuple[str, str], preimage: bytes) -> None:
        """Preimage of an outgoing lock: derive the incoming one (intermediaries)."""
        if key in self.known:
            return
        self.known[key], self.learned_at[key] = preimage, self.now
        prev = self.out[key].in_lock
        if prev is not None and prev in self.inc:
            self._learn(prev, self.run.scheme.derive(preimage, self.inc[prev].payload.tweak))

    def wormhole(self, preimage: bytes) -> None:
        """A colluder's out-of-band preimage: try it on every unresolved incoming lock."""
        for key, info in sorted(self.inc.items()):
            if key not in self.known:
                self._learn(key, self.run.scheme.derive(preimage, info.payload.tweak))

    def _on_fulfill(self, src: str, m: Fulfill) -> bool:
        sess = self._session(m.cid, src)
        if sess is None or sess.busy != (m.seq, m.state_hash):
            return False
        key, o = (m.cid, m.lock_id), self.out.get((m.cid, m.lock_id))
        valid = (o is not None and sess.ch.status(m.lock_id) == LOCKED
                 and self.run.scheme.verify(m.preimage, o.cond))
        try:
            ok = valid and self.now < o.deadline and self.behaviour.cosigns_fulfill(self, key[1])
            if ok and self._cosign(sess, src, SettleOp(m.lock_id, m.preimage), m) is not None:
                self.run.on_resolved(m.cid, m.lock_id, SETTLED, "cooperative", m.preimage)
        finally:
            sess.release((m.seq, m.state_hash))
        if valid:
            self._learn_out(key, m.preimage)
        return valid

    # -- disputes ------------------------------------------------------------------------------
    def _arm(self, key: tuple[str, str], deadline: float, payer: bool) -> None:
        if not self._once("arm", key, payer):
            return
        sim, d = self.run.sim, self.run.params.delta
        if payer and self.behaviour.cheats_refund(self):
            sim.schedule_at(deadline, lambda: self._dispute("REFUND", key, b"", force=True))
        sim.schedule_at(deadline + (d if payer else 3 * d), lambda: self._expire(key, payer))

    def _expire(self, key: tuple[str, str], payer: bool) -> None:
        if self.run.graph.channel(key[0]).status(key[1]) != LOCKED or \
                not self.behaviour.acts_on_expiry(self):
            return
        if payer and key in self.known:
            self._dispute("CONCEDE", key, self.known[key])
        elif key not in self.known:
            self._dispute("REFUND", key, b"")

    def _dispute(self, kind: str, key: tuple[str, str], preimage: bytes,
                 force: bool = False) -> None:
        sess = self._session(key[0])
        pending = force or sess is not None and sess.ch.status(key[1]) == LOCKED
        if sess is None or sess.latest is None or not pending or \
                not self._once("dispute", kind, key, sess.latest.seq):
            return
        for member in sess.committee.members:
            self.send(member, Dispute(kind, key[0], key[1], preimage, sess.latest))
        if kind == "REFUND" and not force:  # a concurrent update may have made it stale: retry
            self.run.sim.schedule(2 * self.run.params.delta + 1e-6,
                                  lambda: self._dispute(kind, key, preimage))

    def _on_verdict(self, src: str, m: Verdict) -> bool:
        v, st = m.vote, m.vote.statement
        sess = self._session(st.cid or "")
        if sess is None or (st.protocol, st.phase) != (PROTOCOL, "VERDICT") or \
                st.decision not in ("SETTLED", "REFUNDED") or v.signer != src or \
                not sess.committee.is_member(src) or not v.verify(self.run.registry):
            return False
        key = (st.cid, st.pid)
        out = self.out.get(key)
        if st.decision == "SETTLED" and out is not None and \
                self.run.scheme.verify(m.preimage, out.cond):
            self._learn_out(key, m.preimage)
        tally = self.tallies.setdefault((key, st.decision), {})
        tally[src] = v
        if len(tally) >= self.run.quorums[2]:
            outcome = SETTLED if st.decision == "SETTLED" else REFUNDED
            self.run.resolve(key[0], key[1], outcome, "verdict", self.known.get(key))
        return True


# -- committee members -----------------------------------------------------------------------------
class Warden(Member):
    """Member of channel ``cid``'s committee: registers states, judges disputes (Brick-style)."""

    def __init__(self, mid: str, signer: Any, registry: KeyRegistry,
                 behaviour: Behaviour | None, run: SyncRun, cid: str):
        super().__init__(mid, signer, registry, behaviour)
        self.run, self.cid = run, cid
        self.decided: dict[str, str] = {}
        self.log: list[tuple[str, str, float]] = []
        self.view: list[Any] = []
        self.rejected = 0

    def on_message(self, src: str, message: Any) -> None:
        self.view.append(message)
        ok = False
        if isinstance(message, Register):
            ok = self._on_register(src, message)
        elif isinstance(message, Dispute):
            ok = self._on_dispute(src, message)
        self.rejected += not ok

    def _on_register(self, src: str, m: Register) -> bool:
        ch = self.run.graph.channel(self.cid)
        if m.cid != self.cid or src not in ch.parties:
            return False
        try:
            self.store.register(self.cid, ch.parties, m.seq, m.state_hash, m.sig_a, m.sig_b)
        except PaymentError:
            return False
        seq, h = self.store.latest[self.cid]
        self.vote_to(Statement(BRICK, "ACK", cid=self.cid, seq=seq, state_hash=h), [src],
                     lambda st, mid, sig: Ack(SignedStatement(st, mid, sig)))
        return True

    def _on_dispute(self, src: str, d: Dispute) -> bool:
        ch, st = self.run.graph.channel(self.cid), d.state
        if d.cid != self.cid or d.kind not in ("CLAIM", "CONCEDE", "REFUND") or \
                src not in ch.parties or opening_digest(st.opening) != st.state_hash:
            return False
        lock = next((lk for lk in st.opening[0][4] if lk[0] == d.lock_id), None)
        cond = dict(st.opening[1]).get(d.lock_id)
        latest = self.store.latest.get(self.cid)
        stale = latest is not None and st.seq < latest[0]
        if lock is None or cond is None or (stale and d.kind == "REFUND"):
            return False
        try:
            self.store.register(self.cid, ch.parties, st.seq, st.state_hash, st.sig_a, st.sig_b)
        except PaymentError:
            return False
        payer, payee, deadline = lock[2], lock[3], lock[6]
        decision = self._judge(d, src, payer, payee, deadline, cond)
        if decision is None:
            return False
        self.decided.setdefault(d.lock_id, decision)
        record = {"CLAIM": "SETTLED", "CONCEDE": "CONCEDED", "REFUND": "REFUNDED"}[d.kind]
        self.log.append((record, d.lock_id, self.now))
        pre = d.preimage
        self.vote_to(verdict_statement(self.cid, d.lock_id, decision), [payee, payer],
                     lambda s, mid, sig: Verdict(SignedStatement(s, mid, sig),
                                                 pre if s.decision == "SETTLED" else b""))
        return True

    def _judge(self, d: Dispute, src: str, payer: str, payee: str, deadline: float,
               cond: bytes) -> str | None:
        override = getattr(self.behaviour, "override", None)
        forced = override(d.kind) if override is not None else None
        if forced is False:
            return None
        if d.kind == "REFUND":
            want, role = "REFUNDED", True
            lag = 0.0 if src == payer else 3 * self.run.params.delta
            timely = self.now >= deadline + lag
        else:
            want, role = "SETTLED", src == (payee if d.kind == "CLAIM" else payer)
            timely = d.kind == "CONCEDE" or self.now < deadline
            if not self.run.scheme.verify(d.preimage, cond):
                return None
        if not role:
            return None
        if forced:
            return want
        prior = self.decided.get(d.lock_id)
        return want if timely and prior in (None, want) else None


# -- the run ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class HopInfo:
    """Ground truth about hop ``index`` (1-based) of a payment, for checkers and metrics."""

    pid: str
    index: int
    cid: str
    lock_id: str
    cond: bytes
    deadline: float
    payer: str
    payee: str
    locked_at: float | None = None
    resolved_at: float | None = None


@dataclasses.dataclass(frozen=True)
class Resolution:
    cid: str
    lock_id: str
    outcome: str
    basis: str
    time: float
    preimage: bytes | None


@dataclasses.dataclass(frozen=True)
class CloseResult:
    decision: CloseDecision
    seq: int
    fraud: tuple[FraudProof, ...]


class SyncRun:
    """One simulation: nodes, committees, payments, ledger outcomes and metrics."""

    def __init__(self, graph: ChannelGraph, params: SyncParams, f: int, seed: int, signer: str,
                 adversary: Adversary):
        self.graph, self.params, self.f, self.adversary = graph, params, f, adversary
        self.quorums = params.thresholds(f)
        self.scheme = params.scheme()
        self.sim = Simulator(seed, SyncNetwork(params.delta, adversary=adversary.delay))
        self.registry = KeyRegistry(seed=seed, scheme=signer)
        self.keys = OnionKeys(seed, graph.parties)
        self.parties: dict[str, Party] = {}
        self.members: dict[str, Warden] = {}
        self.committees: dict[str, Committee] = {}
        self.sessions: dict[str, ChannelSession] = {}
        self.payments: dict[str, PaymentRecord] = {}
        self.hops: dict[str, list[HopInfo]] = {}
        self.hop_at: dict[tuple[str, str], HopInfo] = {}
        self.started: dict[str, float] = {}
        self.completed: dict[str, float] = {}
        self.resolutions: list[Resolution] = []
        self.initial_total, self.before = graph.total_funds(), graph.holdings()
        for p in graph.parties:
            node = Party(p, self, self.registry.enroll(p), adversary.parties.get(p, Honest()))
            self.parties[p] = self.sim.add_node(node)
            node.rng = self.sim.rng_for(f"party/{p}")
        n, _, q_c = self.quorums
        for cid, ch in graph.channels.items():
            com, signers = Committee.create(committee_name(cid), self.registry, f=f, n=n,
                                            quorum=q_c)
            self.committees[cid] = com
            self.sessions[cid] = ChannelSession(self, ch, com)
            for mid in com.members:
                w = Warden(mid, signers[mid], self.registry, adversary.members.get(mid), self, cid)
                self.members[mid] = self.sim.add_node(w)

    # -- bookkeeping ---------------------------------------------------------------------------
    @property
    def records(self) -> list[PaymentRecord]:
        return list(self.payments.values())

    @property
    def trace(self) -> list:
        return self.sim.trace

    @property
    def stats(self) -> MessageStats:
        return self.sim.network.stats

    def add_payment(self, plan: Plan, at: float) -> None:
        cids = tuple(c.cid for c in self.graph.route_channels(plan.path))
        bad = {cid for cid in cids if sum(not self.members[m].correct
                                          for m in self.committees[cid].members) > self.f}
        honest = frozenset(p for p in plan.path if not self.parties[p].behaviour.byzantine)
        self.payments[plan.pid] = PaymentRecord(
            plan.pid, plan.path, cids, plan.amounts, honest=honest,
            correct_channels=frozenset(c for c in cids if c not in bad))
        self.started[plan.pid] = at
        self.parties[plan.path[0]].plans[plan.tag] = plan
        receiver = self.parties[plan.path[-1]]
        self.sim.schedule_at(at, lambda: receiver.send_invoice(plan.pid, plan.path[0],
                                                               plan.value))

    def register_payment(self, pid: str, conds: Sequence[bytes],
                         deadlines: Sequence[float]) -> None:
        rec = self.payments[pid]
        rec.lock_ids = tuple(lock_id_for(c) for c in conds)
        self.hops[pid] = [HopInfo(pid, i + 1, cid, lid, cond, t, rec.parties[i], rec.parties[i + 1])
                          for i, (cid, lid, cond, t) in enumerate(zip(
                              rec.channels, rec.lock_ids, conds, deadlines, strict=True))]
        for hop in self.hops[pid]:
            self.hop_at[(hop.cid, hop.lock_id)] = hop

    def on_locked(self, cid: str, lock_id: str, op: LockOp) -> None:
        hop = self.hop_at.get((cid, lock_id))
        if hop is not None:
            hop.locked_at, hop.deadline = self.sim.now, op.deadline
            self.payments[hop.pid].outcomes[hop.index - 1] = LOCKED

    def on_resolved(self, cid: str, lock_id: str, outcome: str, basis: str,
                    preimage: bytes | None) -> None:
        now = self.sim.now
        self.resolutions.append(Resolution(cid, lock_id, outcome, basis, now, preimage))
        hop = self.hop_at.get((cid, lock_id))
        if hop is not None:
            hop.resolved_at = now
            self.payments[hop.pid].outcomes[hop.index - 1] = outcome
            if hop.index == 1:
                self.completed[hop.pid] = now

    def resolve(self, cid: str, lock_id: str, outcome: str, basis: str,
                preimage: bytes | None) -> bool:
        """Apply a verdict quorum to the ledger (no-op if the lock is no longer pending)."""
        ch = self.graph.channel(cid)
        if ch.status(lock_id) != LOCKED:
            return False
        try:
            ch.settle(lock_id, preimage) if outcome == SETTLED else ch.refund(lock_id)
        except PaymentError:
            return False
        self.on_resolved(cid, lock_id, outcome, basis, preimage)
        return True

    # -- metrics -------------------------------------------------------------------------------
    @property
    def latency(self) -> dict[str, float | None]:
        """Start (invoice request) to the sender's completion (its lock resolved)."""
        return {pid: self.completed[pid] - self.started[pid] if pid in self.completed else None
                for pid in self.payments}

    @property
    def lock_time(self) -> dict[str, float]:
        """Longest time any hop's funds stayed locked (inf if a lock never resolved)."""
        out = {}
        for pid in self.payments:
            spans = [(h.resolved_at if h.resolved_at is not None else math.inf) - h.locked_at
                     for h in self.hops.get(pid, []) if h.locked_at is not None]
            out[pid] = max(spans, default=0.0)
        return out

    def honest_parties(self) -> list[str]:
        return [p for p, node in self.parties.items() if not node.behaviour.byzantine]

    def correct_members(self) -> list[str]:
        return [m for m, w in self.members.items() if w.correct]

    def votes(self, kind: str) -> list[SignedStatement]:
        return [env.message.vote for env in self.sim.network.history if env.kind == kind]

    # -- closing -------------------------------------------------------------------------------
    def close_cooperative(self, cid: str) -> dict[str, int]:
        """Both parties sign the final state; needs no pending lock."""
        ch = self.graph.channel(cid)
        if ch.locks:
            raise LockError(f"cooperative close of {cid!r} needs no pending locks, has "
                            f"{sorted(ch.locks)}")
        return ch.close()

    def close_unilateral(self, cid: str, by: str, at_seq: int | None = None) -> CloseResult:
        """Brick-style close: ``by`` presents its co-signed state ``at_seq`` (latest if None;
        older = stale close); members claim their latest registered state (a ``stale_close``
        member its oldest); the channel closes at the highest of the quorum's claims and the
        presented state, then verdict resolutions are re-applied."""
        ch, sess, com = self.graph.channel(cid), self.sessions[cid], self.committees[cid]
        if by not in ch.parties:
            raise UnknownParty(f"party {by!r} is not an endpoint of channel {cid!r}")
        latest = sess.latest.seq if sess.latest is not None else 0
        presented = latest if at_seq is None else at_seq
        if presented != 0 and presented not in sess.cosigned:
            raise LockError(f"channel {cid!r} has no co-signed state with seq {presented}")
        claims = []
        for mid in com.members:
            w = self.members[mid]
            if w.behaviour.active(w) and cid in w.store.latest:
                stale = getattr(w.behaviour, "stale_close", False)
                claims.append(w.store.claim(cid, min(w.store.states[cid]) if stale else None))
        decision = resolve_close(cid, claims, com, self.registry)
        final = max(decision.seq, presented)
        ch.close(at_seq=final)
        for r in self.resolutions:
            if r.cid == cid and r.basis != "cooperative" and ch.status(r.lock_id) == LOCKED:
                ch.settle(r.lock_id, r.preimage) if r.outcome == SETTLED else ch.refund(r.lock_id)
        acks = [a for a in self.votes("ACK") if a.statement.cid == cid]
        return CloseResult(decision, final, tuple(find_fraud(claims, acks)))

    # -- checks --------------------------------------------------------------------------------
    def violations(self, *, atomicity: bool | None = None) -> list[Violation]:
        """All checkers on the final ledger. By default atomicity covers payments whose
        intermediaries are honest and whose receiver did not :meth:`forfeit <forfeited>` its
        payment: Byzantine parties may always give their own money away."""
        recs, g = self.records, self.graph
        out = check_conservation(g, self.initial_total)
        out += [v for v in check_balance_security(recs, g, self.before)
                if not self._receiver_forfeited(v)]
        atomic = [r for r in recs if atomicity or (atomicity is None and all(
            p in r.honest for p in r.parties[1:-1]) and not self.forfeited(r))]
        out += check_atomicity(atomic, g)
        out += check_termination(recs, g, self.honest_parties())
        out += check_channel_safety(g, self.votes("ACK"), self.committees,
                                    self.correct_members(), self.registry)
        out += check_record_consistency(recs, g)
        return out + check_deadline_discipline(self)

    def forfeited(self, rec: PaymentRecord) -> bool:
        """A Byzantine receiver forfeited its payment: its hop is not settled although its
        preimage reached the sender (e.g. it claimed after ``T_l``). A Byzantine receiver can always
        give up its own payment; the sender holds a proof of payment."""
        sender = self.parties[rec.parties[0]]
        return (rec.parties[-1] not in rec.honest and (rec.channels[0], rec.lock_ids[0]) in
                sender.known and self.graph.channel(rec.channels[-1]).status(
                    rec.lock_ids[-1]) != SETTLED)

    def _receiver_forfeited(self, v: Violation) -> bool:
        """The checker's "sender paid but receiver not paid" clause on a forfeited payment."""
        return any(v.detail.startswith(f"payment {rec.pid}: honest sender ")
                   and "was not paid" in v.detail and self.forfeited(rec) for rec in self.records)

    def privacy_violations(self, optimistic: bool = True) -> list[Violation]:
        """Spec §6.2 item 9 on the recorded views (member views only in optimistic runs)."""
        allowed: dict[str, set[str]] = {}
        for rec in self.records:
            for k in range(1, rec.hops):
                allowed.setdefault(rec.parties[k], set()).update(rec.parties[k - 1:k + 2])
        members = {m: w.view for m, w in self.members.items()} if optimistic else {}
        views = {p: self.parties[p].view for p in sorted(allowed)}
        conds = {pid: [h.cond for h in hops] for pid, hops in self.hops.items()}
        return check_view_privacy(members, views, self.graph.parties, allowed, conds)


def check_deadline_discipline(run: SyncRun) -> list[Violation]:
    """SyncPCN deadlines (spec §6.2 item 6): ``T_i - T_{i+1} >= δ`` on accepted locks; no honest
    member logs SETTLED at/after ``T_i`` or both outcomes; never a SETTLED and a REFUNDED quorum
    for one lock; an honest payer of a settled hop learnt the preimage by ``T_i + Δ``."""
    out, p = [], run.params
    for pid, hops in run.hops.items():
        for a, b in zip(hops, hops[1:], strict=False):
            if a.locked_at is not None and b.locked_at is not None and \
                    a.deadline - b.deadline < p.slack - 1e-9:
                out.append(Violation("deadline", f"{pid}: T_{a.index} - T_{b.index} = "
                                     f"{a.deadline - b.deadline} < δ = {p.slack}"))
    for w in run.members.values():
        kinds: dict[str, set[str]] = {}
        for kind, lid, t in w.log:
            hop = run.hop_at.get((w.cid, lid))
            kinds.setdefault(lid, set()).add(kind)
            if w.correct and kind == "SETTLED" and hop is not None and t >= hop.deadline:
                out.append(Violation("deadline", f"{w.id} logged SETTLED({lid}) at {t} >= "
                                     f"T = {hop.deadline}"))
        for lid, ks in sorted(kinds.items()):
            if w.correct and "REFUNDED" in ks and ks & {"SETTLED", "CONCEDED"}:
                out.append(Violation("deadline", f"{w.id} logged both outcomes for {lid}"))
    signers: dict[tuple, set[str]] = {}
    for v in run.votes("VERDICT"):
        st = v.statement
        com = run.committees.get(st.cid or "")
        if com is not None and com.is_member(v.signer) and v.verify(run.registry):
            signers.setdefault((st.cid, st.pid, st.decision), set()).add(v.signer)
    q_c = run.quorums[2]
    for (cid, lid, decision), who in sorted(signers.items()):
        if decision == "SETTLED" and len(who) >= q_c and \
                len(signers.get((cid, lid, "REFUNDED"), ())) >= q_c:
            out.append(Violation("deadline", f"{cid}/{lid}: SETTLED and REFUNDED quorums"))
    for hop in run.hop_at.values():
        payer = run.parties[hop.payer]
        if payer.behaviour.byzantine or run.graph.channel(hop.cid).status(hop.lock_id) != SETTLED:
            continue
        t = payer.learned_at.get((hop.cid, hop.lock_id))
        if t is None or t > hop.deadline + p.delta + 1e-9:
            out.append(Violation("deadline", f"{hop.pid} hop {hop.index}: honest payer "
                                 f"{hop.payer} paid but learnt the preimage at {t} > T + Δ"))
    return out


# -- driver ----------------------------------------------------------------------------------------
def _plan(graph: ChannelGraph, k: int, payment: Sequence[Any], params: SyncParams) -> Plan:
    """Validate one ``(sender, receiver, value[, path])`` before anything changes."""
    if not isinstance(payment, tuple | list) or len(payment) not in (3, 4):
        raise PaymentError(f"payment {k}: expected (sender, receiver, value[, path]), "
                           f"got {payment!r}")
    sender, receiver, value = payment[:3]
    check_amount(value, f"payment {k} value")
    for party in (sender, receiver, *(payment[3] if len(payment) == 4 else ())):
        if party not in graph.adjacency:
            raise UnknownParty(f"payment {k}: unknown party {party!r}")
        if len(str(party).encode()) > ID_BYTES:
            raise ConfigError(f"payment {k}: party id {party!r} longer than {ID_BYTES} bytes")
    if sender == receiver:
        raise NoRoute(f"payment {k}: sender and receiver are the same party {sender!r}")
    path = tuple(payment[3]) if len(payment) == 4 else graph.path(sender, receiver, value)
    if path[0] != sender or path[-1] != receiver or len(set(path)) != len(path):
        raise NoRoute(f"payment {k}: path {list(path)} must be simple, from {sender!r} to "
                      f"{receiver!r}")
    if len(path) - 1 > MAX_HOPS:
        raise NoRoute(f"payment {k}: {len(path) - 1} hops exceed the onion's {MAX_HOPS}")
    chans = graph.route_channels(path)
    amounts = hop_amounts(value, [params.fee_of(u) for u in path[1:-1]])
    for i, (ch, payer, a) in enumerate(zip(chans, path, amounts, strict=False), 1):
        if ch.balances[payer] < a:
            raise InsufficientBalance(f"payment {k} hop {i}: {payer!r} has {ch.balances[payer]} "
                                      f"on channel {ch.cid!r} (capacity {ch.capacity}), "
                                      f"needs {a}")
    return Plan(f"pay{k}", path, value, amounts, invoice_tag(f"pay{k}"))


def run_syncpcn(graph: ChannelGraph, payments: Sequence[Sequence[Any]], *,
                params: SyncParams | None = None, seed: int = 0,
                adversary: Adversary | None = None, committee_f: int = 1,
                signer: str = "ed25519", spacing: float = 0.0,
                max_events: int = 2_000_000) -> SyncRun:
    """Run SyncPCN payments ``(sender, receiver, value[, path])`` to quiescence.

    Payment ``k`` (id ``pay<k>``) starts at ``k * spacing``. All inputs are validated first: a
    :class:`PaymentError` leaves the graph untouched. Same seed, same trace.
    """
    params = SyncParams() if params is None else params
    params.thresholds(committee_f)
    if signer not in ("ed25519", "hmac"):
        raise ConfigError(f"signer must be 'ed25519' or 'hmac', got {signer!r}")
    adversary = Adversary() if adversary is None else adversary
    plans = [_plan(graph, k, p, params) for k, p in enumerate(payments)]
    unknown = sorted(set(adversary.parties) - set(graph.parties))
    if unknown:
        raise UnknownParty(f"adversary names unknown parties {unknown}")
    run = SyncRun(graph, params, committee_f, seed, signer, adversary)
    bad = sorted(set(adversary.members) - set(run.members))
    if bad:
        raise ConfigError(f"adversary names unknown committee members {bad}")
    for k, plan in enumerate(plans):
        run.add_payment(plan, k * spacing)
    for hook in adversary.hooks:
        hook(run)
    run.sim.run(max_events=max_events)
    return run


class Replayer:
    """Hook: at time ``at`` the network re-delivers every message sent so far, and a Byzantine
    node ``mallory`` re-sends each one to every committee member and party (cross-channel)."""

    def __init__(self, at: float):
        self.at = at

    def __call__(self, run: SyncRun) -> None:
        run.sim.add_node(Node("mallory"))
        run.sim.schedule_at(self.at, lambda: self._fire(run))

    def _fire(self, run: SyncRun) -> None:
        net = run.sim.network
        targets = sorted(run.members) + sorted(run.parties)
        for env in list(net.history):
            if env.replay_of is None and env.src != "mallory":
                net.replay(env.msg_id)
                for dst in targets:
                    if dst != env.dst:
                        run.sim.send("mallory", dst, env.message)
