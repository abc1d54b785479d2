"""SyncPCN channel parties: sender, intermediary and receiver logic, disputes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from decjax.payments.channels import LOCKED, REFUNDED, SETTLED
from decjax.payments.crypto import SignedStatement, Statement
from decjax.payments.errors import PaymentError
from decjax.payments.events import Node
from decjax.payments.registration import BRICK, state_statement
from decjax.payments.syncpcn.adversary import PartyBehaviour
from decjax.payments.syncpcn.messages import (
    Ack,
    Add,
    Cosign,
    CoSigned,
    Dispute,
    Fulfill,
    Invoice,
    Register,
    Verdict,
)
from decjax.payments.syncpcn.params import PROTOCOL, invoice_tag
from decjax.payments.syncpcn.privacy import HopPayload, build_onion, lock_id_for, peel_onion
from decjax.payments.syncpcn.session import ChannelSession, LockOp, SettleOp

if TYPE_CHECKING:
    from decjax.payments.syncpcn.run import SyncRun


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
