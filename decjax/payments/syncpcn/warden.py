"""SyncPCN committee members: register co-signed states and judge disputes (Brick-style)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from decjax.payments.committee import Behaviour, Member
from decjax.payments.crypto import KeyRegistry, SignedStatement, Statement
from decjax.payments.errors import PaymentError
from decjax.payments.registration import BRICK
from decjax.payments.syncpcn.messages import (
    Ack,
    Dispute,
    Register,
    Verdict,
    opening_digest,
    verdict_statement,
)

if TYPE_CHECKING:
    from decjax.payments.syncpcn.run import SyncRun


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
