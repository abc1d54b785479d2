"""Brick-style registration of channel states with a committee member, and fraud proofs.

Both channel parties sign ``state_statement(cid, seq, H(state))``; a member verifies both
signatures, keeps the highest ``seq`` per channel and returns a signed ``ACK`` for the state it
now stores. At close, each member signs a ``CLAIM`` of its latest state; the channel closes at
the highest claimed ``seq`` among at least ``quorum`` distinct member claims. A claim older
than an ``ACK`` the same member signed is a :class:`FraudProof` (Brick slashes that member's
collateral [V]; what the payment protocol does with it is [R]).

The committee sees only ``(cid, seq, state hash)``, as with Brick's ``BlindedState`` [V].

Examples:
    >>> from decjax.payments.crypto import KeyRegistry
    >>> reg = KeyRegistry(seed=0, scheme="hmac")
    >>> a, b, w = reg.enroll("a"), reg.enroll("b"), reg.enroll("w")
    >>> store = RegistrationStore("w", w, reg)
    >>> st = state_statement("c1", 3, b"h" * 32)
    >>> ack = store.register("c1", ("a", "b"), 3, b"h" * 32, a.sign(st), b.sign(st))
    >>> ack.statement.seq, ack.verify(reg)
    (3, True)
    >>> stale = store.claim("c1", at_seq=3)  # fine: not older than its own ACK
    >>> find_fraud([stale], [ack])
    []
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from decjax.payments.crypto import KeyRegistry, SignedStatement, Signer, Statement
from decjax.payments.errors import CryptoError, LockError, PaymentError

if TYPE_CHECKING:
    from decjax.payments.committee import Committee

BRICK = "brick"


def state_statement(cid: str, seq: int, state_hash: bytes) -> Statement:
    """What both channel parties co-sign for one channel state."""
    return Statement(BRICK, "STATE", cid=cid, seq=seq, state_hash=state_hash)


class RegistrationStore:
    """One member's registered channel states (max ``seq`` per channel)."""

    def __init__(self, member_id: str, signer: Signer, registry: KeyRegistry):
        self.member_id, self.signer, self.registry = member_id, signer, registry
        self.latest: dict[str, tuple[int, bytes]] = {}
        self.states: dict[str, dict[int, bytes]] = {}

    def register(self, cid: str, parties: Sequence[str], seq: int, state_hash: bytes,
                 sig_a: bytes, sig_b: bytes) -> SignedStatement:
        """Store ``(seq, state_hash)`` if both parties signed it and it is newer; return a signed
        ACK of the state stored afterwards (so an older registration learns the newer seq)."""
        if not isinstance(seq, int) or seq < 0:
            raise PaymentError(f"register {cid!r}: seq must be an int >= 0, got {seq!r}")
        st = state_statement(cid, seq, state_hash)
        a, b = parties
        for party, sig in ((a, sig_a), (b, sig_b)):
            if not self.registry.verify(party, st, sig):
                raise CryptoError(f"register {cid!r} seq {seq}: invalid signature of {party!r}")
        self.states.setdefault(cid, {})[seq] = state_hash
        if cid not in self.latest or seq > self.latest[cid][0]:
            self.latest[cid] = (seq, state_hash)
        top_seq, top_hash = self.latest[cid]
        return self.signer.vote(Statement(BRICK, "ACK", cid=cid, seq=top_seq,
                                          state_hash=top_hash))

    def claim(self, cid: str, at_seq: int | None = None) -> SignedStatement:
        """Signed CLAIM of the latest state, or of an older registered one (a stale claim)."""
        if cid not in self.latest:
            raise LockError(f"member {self.member_id!r} has no registration for {cid!r}")
        seq = self.latest[cid][0] if at_seq is None else at_seq
        if seq not in self.states[cid]:
            raise LockError(f"member {self.member_id!r} never registered {cid!r} seq {seq}")
        return self.signer.vote(Statement(BRICK, "CLAIM", cid=cid, seq=seq,
                                          state_hash=self.states[cid][seq]))


@dataclasses.dataclass(frozen=True)
class FraudProof:
    """A member's ``claim`` older than an ``ack`` it signed for the same channel."""

    ack: SignedStatement
    claim: SignedStatement

    @property
    def member(self) -> str:
        return self.claim.signer

    def verify(self, registry: KeyRegistry) -> bool:
        a, c = self.ack, self.claim
        return (a.signer == c.signer and a.statement.phase == "ACK"
                and c.statement.phase == "CLAIM" and a.statement.protocol == BRICK
                and c.statement.protocol == BRICK and a.statement.cid == c.statement.cid
                and c.statement.seq < a.statement.seq
                and a.verify(registry) and c.verify(registry))


def find_fraud(claims: Iterable[SignedStatement],
               acks: Iterable[SignedStatement]) -> list[FraudProof]:
    """Fraud proofs for claims older than the newest ACK of the same member and channel."""
    newest: dict[tuple[str, str | None], SignedStatement] = {}
    for ack in acks:
        key = (ack.signer, ack.statement.cid)
        if key not in newest or ack.statement.seq > newest[key].statement.seq:
            newest[key] = ack
    proofs = []
    for claim in claims:
        ack = newest.get((claim.signer, claim.statement.cid))
        if ack is not None and claim.statement.seq < ack.statement.seq:
            proofs.append(FraudProof(ack, claim))
    return proofs


@dataclasses.dataclass(frozen=True)
class CloseDecision:
    """Outcome of a pessimistic close: the state to close at and who claimed."""

    cid: str
    seq: int
    state_hash: bytes
    claimants: tuple[str, ...]


def resolve_close(cid: str, claims: Iterable[SignedStatement], committee: Committee,
                  registry: KeyRegistry) -> CloseDecision:
    """Close at the highest seq among >= ``committee.quorum`` distinct valid member claims."""
    best: dict[str, SignedStatement] = {}
    for c in claims:
        st = c.statement
        if (st.protocol, st.phase, st.cid) != (BRICK, "CLAIM", cid):
            continue
        if committee.is_member(c.signer) and c.signer not in best and c.verify(registry):
            best[c.signer] = c
    if len(best) < committee.quorum:
        raise PaymentError(f"close of {cid!r} needs {committee.quorum} distinct valid member "
                           f"claims, got {len(best)}")
    top = max(best.values(), key=lambda c: (c.statement.seq, c.signer))
    return CloseDecision(cid, top.statement.seq, top.statement.state_hash, tuple(sorted(best)))
