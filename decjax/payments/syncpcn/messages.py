"""SyncPCN wire messages (INVOICE, ADD, FULFILL, COSIGN, REGISTER, ACK, disputes, VERDICT)."""

from __future__ import annotations

import dataclasses

from decjax.payments.crypto import SignedStatement, Statement, digest
from decjax.payments.syncpcn.params import PROTOCOL


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
