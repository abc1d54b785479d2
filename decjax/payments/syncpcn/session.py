"""Both endpoints' shared view of one channel: co-signed states and the update queue."""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from decjax.payments.channels import Channel
from decjax.payments.committee import Committee
from decjax.payments.errors import PaymentError
from decjax.payments.syncpcn.messages import CoSigned, opening_digest

if TYPE_CHECKING:
    from decjax.payments.syncpcn.party import Party
    from decjax.payments.syncpcn.run import SyncRun


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
