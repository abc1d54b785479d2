"""One SyncPCN simulation (:class:`SyncRun`), its deadline checks and the driver."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from decjax.payments.channels import LOCKED, SETTLED, check_amount, hop_amounts
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
from decjax.payments.committee import Committee
from decjax.payments.crypto import KeyRegistry, SignedStatement
from decjax.payments.errors import (
    ConfigError,
    InsufficientBalance,
    LockError,
    NoRoute,
    PaymentError,
    UnknownParty,
)
from decjax.payments.events import Simulator
from decjax.payments.graph import ChannelGraph
from decjax.payments.network import MessageStats, SyncNetwork
from decjax.payments.registration import CloseDecision, FraudProof, find_fraud, resolve_close
from decjax.payments.syncpcn.adversary import Adversary, Honest
from decjax.payments.syncpcn.params import SyncParams, committee_name, invoice_tag
from decjax.payments.syncpcn.party import Party, Plan
from decjax.payments.syncpcn.privacy import (
    ID_BYTES,
    MAX_HOPS,
    OnionKeys,
    check_view_privacy,
    lock_id_for,
)
from decjax.payments.syncpcn.session import ChannelSession, LockOp
from decjax.payments.syncpcn.warden import Warden


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

