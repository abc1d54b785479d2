"""Committees of signing members and pluggable member behaviours (adversary strategies).

* :class:`Committee`: an ordered, duplicate-free tuple of member ids with a fault bound ``f``
  and a quorum. :meth:`Committee.bft` enforces ``n == 3f+1``, ``quorum == 2f+1`` (PSyncPCN,
  Brick). :meth:`Committee.general` takes any ``(f, quorum)``: SyncPCN's committee size and
  ACK/claim quorums are open questions of the spec (§5.2 item 3, [R]), so they stay parameters.
* :class:`Member`: a :class:`~decjax.payments.events.Node` holding a signer, a
  :class:`~decjax.payments.registration.RegistrationStore` and a :class:`Behaviour`.
  Protocol modules subclass it and implement ``on_message``; they sign through
  :meth:`Member.sign` / :meth:`Member.vote_to`, which consult the behaviour.
* Behaviours: :class:`CorrectBehaviour` (never signs two different statements for one
  ``Statement.slot()``), :class:`Crashed` (silent from a time or a phase on) and
  :class:`Equivocating` (sends conflicting signed statements to different recipients). A new
  strategy overrides any of ``active``, ``on_message``, ``on_send``, ``statements_for``.

Examples:
    >>> from decjax.payments.crypto import KeyRegistry
    >>> reg = KeyRegistry(seed=0, scheme="hmac")
    >>> com, signers = Committee.create("W1", f=1, registry=reg)
    >>> com.n, com.quorum, com.members[0]
    (4, 3, 'W1.m0')
    >>> Committee.bft(["a", "b", "c"], f=1)
    Traceback (most recent call last):
    ...
    decjax.payments.errors.ConfigError: n must be 3f+1, got n=3 with f=1 (expected n=4)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from decjax.payments.crypto import KeyRegistry, QuorumCertificate, Signer, Statement
from decjax.payments.errors import ConfigError
from decjax.payments.events import Node
from decjax.payments.registration import RegistrationStore


@dataclasses.dataclass(frozen=True)
class Committee:
    """``members`` (ordered ids), fault bound ``f`` and decision ``quorum``."""

    members: tuple[str, ...]
    f: int
    quorum: int
    name: str = ""

    def __post_init__(self) -> None:
        members = tuple(self.members)
        object.__setattr__(self, "members", members)
        if not members:
            raise ConfigError(f"committee {self.name!r} needs at least one member")
        if len(set(members)) != len(members):
            dup = sorted({m for m in members if members.count(m) > 1})
            raise ConfigError(f"committee {self.name!r} has duplicate members {dup}")
        n = len(members)
        if not (isinstance(self.f, int) and 0 <= self.f < n):
            raise ConfigError(f"f must be an int in [0, n-1] = [0, {n - 1}], got {self.f!r}")
        if not (isinstance(self.quorum, int) and 1 <= self.quorum <= n):
            raise ConfigError(f"quorum must be an int in [1, n] = [1, {n}], got {self.quorum!r}")

    @classmethod
    def bft(cls, members: Sequence[str], f: int | None = None, name: str = "") -> Committee:
        """BFT committee: ``n == 3f+1`` (f defaults to ``(n-1)//3``), quorum ``2f+1``."""
        n = len(members)
        f = (n - 1) // 3 if f is None else f
        if n != 3 * f + 1:
            raise ConfigError(f"n must be 3f+1, got n={n} with f={f} (expected n={3 * f + 1})")
        return cls(tuple(members), f, 2 * f + 1, name)

    @classmethod
    def general(cls, members: Sequence[str], *, f: int, quorum: int, name: str = "") -> Committee:
        """Any size, fault bound and quorum (SyncPCN's thresholds are open, spec §5.2 [R])."""
        return cls(tuple(members), f, quorum, name)

    @classmethod
    def create(cls, name: str, registry: KeyRegistry, *, f: int = 1, n: int | None = None,
               quorum: int | None = None) -> tuple[Committee, dict[str, Signer]]:
        """Enroll members ``<name>.m0..`` in ``registry``; BFT unless ``n``/``quorum`` given."""
        size = 3 * f + 1 if n is None else n
        ids = [f"{name}.m{i}" for i in range(size)]
        if n is None and quorum is None:
            committee = cls.bft(ids, f, name)
        else:
            committee = cls.general(ids, f=f, quorum=2 * f + 1 if quorum is None else quorum,
                                    name=name)
        return committee, {m: registry.enroll(m) for m in ids}

    @property
    def n(self) -> int:
        return len(self.members)

    def is_member(self, member_id: str) -> bool:
        return member_id in self.members

    def verify_qc(self, qc: QuorumCertificate, registry: KeyRegistry,
                  threshold: int | None = None) -> bool:
        """``qc`` carries ``threshold`` (default: the quorum) distinct valid member signatures."""
        return qc.verify(registry, self.members, self.quorum if threshold is None else threshold)


class Behaviour:
    """Strategy of a member. The base class behaves correctly; strategies override hooks."""

    byzantine = False

    def active(self, member: Member) -> bool:
        """False once the member stopped (crash)."""
        return True

    def on_message(self, member: Member, src: str, message: Any) -> bool:
        """Whether the member processes an incoming message."""
        return self.active(member)

    def on_send(self, member: Member, dst: str, message: Any) -> Any | None:
        """The message actually sent (None drops it)."""
        return message if self.active(member) else None

    def statements_for(self, member: Member, statement: Statement,
                       recipients: Sequence[str]) -> list[tuple[str, Statement]]:
        """``(recipient, statement to sign for it)`` pairs; correct: the same one for all."""
        if not self.active(member) or not member.may_sign(statement):
            return []
        return [(r, statement) for r in recipients]


class CorrectBehaviour(Behaviour):
    """Follows the protocol."""


class Crashed(Behaviour):
    """Stops for good at ``at_time`` or when first asked to sign a statement of ``at_phase``."""

    byzantine = True

    def __init__(self, at_time: float | None = None, at_phase: str | None = None):
        if at_time is None and at_phase is None:
            at_time = 0.0
        self.at_time, self.at_phase = at_time, at_phase
        self.crashed = False

    def active(self, member: Member) -> bool:
        if self.at_time is not None and member.now >= self.at_time:
            self.crashed = True
        return not self.crashed

    def statements_for(self, member: Member, statement: Statement,
                       recipients: Sequence[str]) -> list[tuple[str, Statement]]:
        if self.at_phase is not None and statement.phase == self.at_phase:
            self.crashed = True
        return super().statements_for(member, statement, recipients)


def flip_decision(statement: Statement) -> Statement:
    """COMMIT <-> ABORT; any other statement gets a different state hash."""
    flips = {"COMMIT": "ABORT", "ABORT": "COMMIT"}
    if statement.decision in flips:
        return statement.replace(decision=flips[statement.decision])
    return statement.replace(state_hash=b"\x00" * 32 if statement.state_hash != b"\x00" * 32
                             else b"\x01" * 32)


class Equivocating(Behaviour):
    """Signs ``statement`` for even-indexed recipients and ``conflict(statement)`` for the
    others (recipients in the order given), ignoring the one-statement-per-slot rule."""

    byzantine = True

    def __init__(self, conflict: Callable[[Statement], Statement] = flip_decision):
        self.conflict = conflict

    def statements_for(self, member: Member, statement: Statement,
                       recipients: Sequence[str]) -> list[tuple[str, Statement]]:
        other = self.conflict(statement)
        return [(r, statement if i % 2 == 0 else other) for i, r in enumerate(recipients)]


class Member(Node):
    """A committee member node. Subclass and implement ``on_message(src, message)``.

    Args:
      member_id: node id (also the key id in ``registry``).
      signer: the member's signer.
      registry: PKI used to verify parties' and peers' signatures.
      behaviour: strategy; :class:`CorrectBehaviour` by default.
    """

    def __init__(self, member_id: str, signer: Signer, registry: KeyRegistry,
                 behaviour: Behaviour | None = None):
        super().__init__(member_id)
        self.signer, self.registry = signer, registry
        self.behaviour = behaviour if behaviour is not None else CorrectBehaviour()
        self.store = RegistrationStore(member_id, signer, registry)
        self.signed: dict[tuple, Statement] = {}

    @property
    def correct(self) -> bool:
        return not self.behaviour.byzantine

    def receive(self, src: str, message: Any) -> None:
        if self.behaviour.on_message(self, src, message):
            self.on_message(src, message)

    def send(self, dst: str, message: Any) -> None:
        out = self.behaviour.on_send(self, dst, message)
        if out is not None:
            super().send(dst, out)

    def may_sign(self, statement: Statement) -> bool:
        """Correct rule: at most one statement per slot (re-signing the same one is fine)."""
        prior = self.signed.get(statement.slot())
        return prior is None or prior == statement

    def _sign(self, statement: Statement) -> bytes:
        self.signed.setdefault(statement.slot(), statement)
        return self.signer.sign(statement)

    def sign(self, statement: Statement) -> bytes | None:
        """Signature on ``statement`` if the behaviour allows it, else None."""
        plan = self.behaviour.statements_for(self, statement, [self.id])
        return self._sign(plan[0][1]) if plan else None

    def vote_to(self, statement: Statement, recipients: Sequence[str],
                make_message: Callable[[Statement, str, bytes], Any]) -> int:
        """Sign and send ``make_message(statement, self.id, sig)`` to each recipient, as the
        behaviour dictates (equivocators sign different statements). Returns messages sent."""
        plan = self.behaviour.statements_for(self, statement, recipients)
        sigs: dict[Statement, bytes] = {}
        for dst, st in plan:
            if st not in sigs:
                sigs[st] = self._sign(st)
            self.send(dst, make_message(st, self.id, sigs[st]))
        return len(plan)
