"""Two-party payment channels with hash/time locks.

A :class:`Channel` between parties ``a`` and ``b`` holds integer balances and pending
:class:`Lock` s, with the invariant ``bal_a + bal_b + sum(pending lock amounts) == capacity``.
``lock`` moves an amount from the payer's balance into a lock; ``settle`` pays it to the payee;
``refund`` returns it to the payer. Every state change bumps ``seq`` and keeps a snapshot, so a
(possibly stale) close can be replayed at any past ``seq`` and checked for channel safety.

Every operation validates first and mutates after: a raised :class:`PaymentError` leaves the
channel exactly as it was.

Examples:
    >>> ch = Channel.open("c1", "alice", "bob", 10, 5)
    >>> _ = ch.lock("p1/1", payer="alice", amount=3, pid="p1")
    >>> ch.balances, ch.locked_amount()
    ({'alice': 7, 'bob': 5}, 3)
    >>> _ = ch.settle("p1/1"); ch.balances, ch.seq, ch.status("p1/1")
    ({'alice': 7, 'bob': 8}, 2, 'settled')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from decjax.payments.crypto import check_preimage, digest
from decjax.payments.errors import (
    ChannelClosed,
    DuplicateLock,
    InsufficientBalance,
    InvalidAmount,
    LockError,
    PaymentError,
    UnknownLock,
    UnknownParty,
)

SETTLED, REFUNDED, LOCKED, ABSENT = "settled", "refunded", "locked", "absent"


def check_amount(amount: Any, what: str = "amount", *, allow_zero: bool = False) -> int:
    """``amount`` as an int (> 0, or >= 0 with ``allow_zero``), else :class:`InvalidAmount`."""
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise InvalidAmount(f"{what} must be an int (smallest currency unit), got {amount!r}")
    if amount < 0 or (amount == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "positive"
        raise InvalidAmount(f"{what} must be {bound}, got {amount}")
    return amount


def hop_amounts(value: int, fees: Sequence[int]) -> tuple[int, ...]:
    """Per-hop amounts ``a_1..a_l`` with ``a_l = value`` and ``a_i = a_{i+1} + fees[i]``.

    ``fees`` holds one fee per intermediary ``u_1..u_{l-1}`` (so ``l = len(fees) + 1``).

    >>> hop_amounts(100, [2, 1])
    (103, 101, 100)
    """
    check_amount(value, "payment value")
    amounts = [value]
    for i, fee in enumerate(reversed(list(fees))):
        amounts.append(amounts[-1] + check_amount(fee, f"fee[{len(fees) - 1 - i}]",
                                                  allow_zero=True))
    return tuple(reversed(amounts))


@dataclasses.dataclass(frozen=True)
class Lock:
    """``amount`` promised by ``payer`` to ``payee``, released by preimage, decision or deadline.

    ``hashlock`` is ``sha256(x)`` for HTLC-style locks (SyncPCN) and None for locks resolved by a
    committee decision (PSyncPCN).
    """

    lock_id: str
    amount: int
    payer: str
    payee: str
    pid: str | bytes | None = None
    hashlock: bytes | None = None
    deadline: float | None = None


@dataclasses.dataclass
class Channel:
    """A two-party channel; build with :meth:`open`."""

    cid: str
    a: str
    b: str
    capacity: int
    balances: dict[str, int]
    locks: dict[str, Lock] = dataclasses.field(default_factory=dict)
    seq: int = 0
    is_open: bool = True
    resolved: dict[str, str] = dataclasses.field(default_factory=dict)
    closed_seq: int | None = None
    history: list[tuple] = dataclasses.field(default_factory=list, repr=False)

    @classmethod
    def open(cls, cid: str, a: str, b: str, bal_a: int, bal_b: int) -> Channel:
        if a == b:
            raise PaymentError(f"channel {cid!r}: endpoints must differ, got {a!r} twice")
        check_amount(bal_a, f"channel {cid!r} balance of {a!r}", allow_zero=True)
        check_amount(bal_b, f"channel {cid!r} balance of {b!r}", allow_zero=True)
        if bal_a + bal_b == 0:
            raise InvalidAmount(f"channel {cid!r}: capacity must be positive, got 0")
        ch = cls(cid, a, b, bal_a + bal_b, {a: bal_a, b: bal_b})
        ch._remember()
        return ch

    # -- queries -------------------------------------------------------------------------------
    @property
    def parties(self) -> tuple[str, str]:
        return (self.a, self.b)

    def counterparty(self, party: str) -> str:
        self._party(party)
        return self.b if party == self.a else self.a

    def locked_amount(self) -> int:
        return sum(lk.amount for lk in self.locks.values())

    def status(self, lock_id: str) -> str:
        """``"locked"``, ``"settled"``, ``"refunded"`` or ``"absent"``."""
        if lock_id in self.locks:
            return LOCKED
        return self.resolved.get(lock_id, ABSENT)

    def state(self) -> tuple:
        """The channel state as plain, comparable values (balances, pending locks, seq)."""
        locks = tuple(dataclasses.astuple(self.locks[k]) for k in sorted(self.locks))
        return (self.cid, self.seq, self.balances[self.a], self.balances[self.b], locks)

    def state_hash(self) -> bytes:
        """SHA-256 of :meth:`state`: what both parties co-sign and committees register."""
        return digest("channel-state", *self.state())

    def snapshot(self) -> tuple:
        """Full comparable snapshot (state plus open flag and resolutions), for tests."""
        return (self.state(), self.is_open, tuple(sorted(self.resolved.items())),
                self.closed_seq)

    def check_invariant(self) -> None:
        total = self.balances[self.a] + self.balances[self.b] + self.locked_amount()
        if total != self.capacity or min(self.balances.values()) < 0:
            raise AssertionError(f"channel {self.cid}: conservation broken, "
                                 f"{self.balances} + locks {self.locked_amount()} "
                                 f"!= capacity {self.capacity}")

    # -- validation helpers --------------------------------------------------------------------
    def _party(self, party: str) -> None:
        if party not in self.balances:
            raise UnknownParty(f"party {party!r} is not an endpoint of channel {self.cid!r} "
                               f"({self.a!r}, {self.b!r})")

    def _require_open(self, action: str) -> None:
        if not self.is_open:
            raise ChannelClosed(f"cannot {action}: channel {self.cid!r} is closed")

    def _pending(self, lock_id: str) -> Lock:
        if lock_id not in self.locks:
            why = f"already {self.resolved[lock_id]}" if lock_id in self.resolved else "unknown"
            raise UnknownLock(f"lock {lock_id!r} on channel {self.cid!r} is {why}")
        return self.locks[lock_id]

    def _remember(self) -> None:
        self.history.append((self.seq, dict(self.balances), dict(self.locks), dict(self.resolved)))

    # -- operations ----------------------------------------------------------------------------
    def lock(self, lock_id: str, payer: str, amount: int, *, pid: str | bytes | None = None,
             hashlock: bytes | None = None, deadline: float | None = None) -> Lock:
        """Move ``amount`` from ``payer``'s balance into a new pending lock."""
        self._require_open("lock")
        self._party(payer)
        check_amount(amount, f"lock {lock_id!r} amount")
        if lock_id in self.locks or lock_id in self.resolved:
            raise DuplicateLock(f"lock id {lock_id!r} already used on channel {self.cid!r}")
        if amount > self.capacity:
            raise InsufficientBalance(f"lock {lock_id!r}: amount {amount} exceeds capacity "
                                      f"{self.capacity} of channel {self.cid!r}")
        if amount > self.balances[payer]:
            raise InsufficientBalance(f"lock {lock_id!r}: insufficient balance of {payer!r} on "
                                      f"channel {self.cid!r}: has {self.balances[payer]}, "
                                      f"needs {amount}")
        lk = Lock(lock_id, amount, payer, self.counterparty(payer), pid, hashlock, deadline)
        self.balances[payer] -= amount
        self.locks[lock_id] = lk
        self.seq += 1
        self._remember()
        return lk

    def settle(self, lock_id: str, preimage: bytes | None = None, *,
               now: float | None = None) -> Lock:
        """Pay a pending lock to its payee. Hash-locked locks need the preimage; with ``now``,
        an expired lock (``now >= deadline``) cannot settle."""
        lk = self._pending(lock_id)
        bad_preimage = preimage is None or not check_preimage(preimage, lk.hashlock or b"")
        if lk.hashlock is not None and bad_preimage:
            raise LockError(f"lock {lock_id!r} on channel {self.cid!r}: missing or wrong preimage")
        if now is not None and lk.deadline is not None and now >= lk.deadline:
            raise LockError(f"lock {lock_id!r} on channel {self.cid!r} expired at "
                            f"{lk.deadline}, now {now}")
        return self._resolve(lk, lk.payee, SETTLED)

    def refund(self, lock_id: str) -> Lock:
        """Return a pending lock to its payer (abort, or deadline passed)."""
        lk = self._pending(lock_id)
        return self._resolve(lk, lk.payer, REFUNDED)

    def _resolve(self, lk: Lock, to: str, outcome: str) -> Lock:
        # Resolving pending locks stays allowed after close: disputes finish on the closed state.
        del self.locks[lk.lock_id]
        self.balances[to] += lk.amount
        self.resolved[lk.lock_id] = outcome
        self.seq += 1
        self._remember()
        return lk

    def close(self, at_seq: int | None = None) -> dict[str, int]:
        """Close the channel at its latest state, or restore the state of ``at_seq`` first.

        Closing at an older ``seq`` models a stale close; :mod:`decjax.payments.checkers`
        flags it when a newer state was registered. Pending locks of the closing state stay
        pending (to be settled/refunded by the dispute process). Returns final balances.
        """
        self._require_open("close")
        if at_seq is not None:
            snap = next((h for h in self.history if h[0] == at_seq), None)
            if snap is None:
                raise LockError(f"channel {self.cid!r} has no state with seq {at_seq} "
                                f"(latest {self.seq})")
            self.seq, balances, locks, resolved = snap
            self.balances, self.locks, self.resolved = dict(balances), dict(locks), dict(resolved)
        self.is_open = False
        self.closed_seq = self.seq
        return dict(self.balances)
