"""PSyncPCN payment requests, routes and wire messages (consent, INIT, votes)."""

from __future__ import annotations

import dataclasses

from decjax.payments.crypto import Statement, digest

PROTO = "psync"
COMMIT, ABORT = "COMMIT", "ABORT"
DELEGATION = "resolve only by DECISION-QC(pid)"


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


def consent_statements(route: Route, party: str) -> tuple[Statement, Statement]:
    """What ``u_k`` (k >= 1) signs at INIT: ``COND_k`` as payee, then ``COND_{k+1}`` as payer
    (or, for the receiver, its acceptance)."""
    k = route.parties.index(party)
    return route.cond(k - 1), (route.cond(k) if k < route.hops else route.accept())
