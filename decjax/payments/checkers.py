"""Protocol-agnostic invariant checkers (spec §6.2) over ledgers and payment records.

A protocol fills one :class:`PaymentRecord` per payment (path, per-hop amounts and lock ids,
which parties are honest, which channels are correct). Checkers read the records and, when
given a :class:`~decjax.payments.graph.ChannelGraph`, take hop outcomes from the ledger itself
(``channel.status(lock_id)``) rather than from what the protocol reported. Each checker returns
a list of :class:`Violation`; an empty list means the property holds.

The property set is the spec's [R] reconstruction (§2.2): balance security, atomicity,
termination, QC uniqueness, channel safety, plus conservation. Confirm names and exact
definitions against the paper (§5.2 item 1).

Examples:
    >>> rec = PaymentRecord("p1", ("s", "i", "r"), ("c1", "c2"), (11, 10),
    ...                     honest=frozenset({"s", "i", "r"}), outcomes=["settled", "refunded"])
    >>> [v.property for v in check_atomicity([rec])]
    ['atomicity']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping, Sequence

from decjax.payments.channels import ABSENT, LOCKED, REFUNDED, SETTLED
from decjax.payments.committee import Committee
from decjax.payments.crypto import KeyRegistry, QuorumCertificate, SignedStatement
from decjax.payments.errors import PaymentError
from decjax.payments.graph import ChannelGraph
from decjax.payments.registration import BRICK

OUTCOMES = (ABSENT, LOCKED, SETTLED, REFUNDED)


@dataclasses.dataclass(frozen=True)
class Violation:
    """A broken property and a human-readable detail naming the payment/party/channel."""

    property: str
    detail: str


@dataclasses.dataclass
class PaymentRecord:
    """What a protocol reports about one multi-hop payment.

    Attributes:
      pid: payment id.
      parties: path ``u_0 = S, ..., u_l = R``.
      channels: ``c_1..c_l`` with ``c_i = (u_{i-1}, u_i)``.
      amounts: ``a_1..a_l``; ``u_{i-1}`` pays ``a_i`` over ``c_i``; ``a_l`` is the value.
      honest: parties that follow the protocol (membership only).
      outcomes: per hop, one of ``absent|locked|settled|refunded``; protocols keep it current.
      lock_ids: per hop lock id on the channel; default ``"<pid>/<i>"`` (i from 1).
      correct_channels: channels whose committee is correct; None means all are.
    """

    pid: str
    parties: tuple[str, ...]
    channels: tuple[str, ...]
    amounts: tuple[int, ...]
    honest: frozenset[str] = frozenset()
    outcomes: list[str] = dataclasses.field(default_factory=list)
    lock_ids: tuple[str, ...] = ()
    correct_channels: frozenset[str] | None = None

    def __post_init__(self) -> None:
        hops = len(self.channels)
        if hops < 1 or len(self.parties) != hops + 1 or len(self.amounts) != hops:
            raise PaymentError(f"record {self.pid!r}: need l >= 1 channels, l+1 parties and l "
                               f"amounts, got {len(self.channels)}, {len(self.parties)}, "
                               f"{len(self.amounts)}")
        if any(not isinstance(a, int) or a <= 0 for a in self.amounts):
            raise PaymentError(f"record {self.pid!r}: amounts must be positive ints")
        if any(x < y for x, y in zip(self.amounts, self.amounts[1:], strict=False)):
            raise PaymentError(f"record {self.pid!r}: amounts must not increase along the path "
                               f"(fees are >= 0), got {self.amounts}")
        if not self.outcomes:
            self.outcomes = [ABSENT] * hops
        if len(self.outcomes) != hops or any(o not in OUTCOMES for o in self.outcomes):
            raise PaymentError(f"record {self.pid!r}: outcomes must be {hops} of {OUTCOMES}, "
                               f"got {self.outcomes}")
        if not self.lock_ids:
            self.lock_ids = tuple(f"{self.pid}/{i}" for i in range(1, hops + 1))
        self.honest = frozenset(self.honest)

    @property
    def hops(self) -> int:
        return len(self.channels)

    @property
    def value(self) -> int:
        return self.amounts[-1]

    def fee(self, k: int) -> int:
        """Fee earned by intermediary ``u_k`` (1 <= k < l): ``a_k - a_{k+1}``."""
        return self.amounts[k - 1] - self.amounts[k]

    def observed_outcomes(self, graph: ChannelGraph | None) -> list[str]:
        """Hop outcomes from the ledger when ``graph`` is given, else the reported ones."""
        if graph is None:
            return list(self.outcomes)
        return [graph.channel(c).status(lk) for c, lk in zip(self.channels, self.lock_ids,
                                                              strict=True)]

    def net_changes(self, outcomes: Sequence[str]) -> list[int]:
        """Net balance change of each ``u_k`` implied by per-hop outcomes."""
        nets = [0] * (self.hops + 1)
        for i, (amount, outcome) in enumerate(zip(self.amounts, outcomes, strict=True)):
            if outcome == SETTLED:
                nets[i] -= amount
                nets[i + 1] += amount
        return nets


def check_conservation(graph: ChannelGraph, initial_total: int | None = None) -> list[Violation]:
    """Per channel ``bal_a + bal_b + locks == capacity`` and no negative balance; the global
    sum equals ``initial_total`` when given."""
    out = []
    for cid, ch in graph.channels.items():
        total = sum(ch.balances.values()) + ch.locked_amount()
        if total != ch.capacity or min(ch.balances.values()) < 0:
            out.append(Violation("conservation", f"channel {cid}: balances {ch.balances} + locks "
                                 f"{ch.locked_amount()} != capacity {ch.capacity}"))
    if initial_total is not None:
        now = sum(sum(ch.balances.values()) + ch.locked_amount() for ch in graph.channels.values())
        if now != initial_total:
            out.append(Violation("conservation", f"global funds {now} != initial {initial_total}"))
    return out


def check_balance_security(records: Iterable[PaymentRecord], graph: ChannelGraph | None = None,
                           before: Mapping[str, int] | None = None) -> list[Violation]:
    """No honest party loses (checked at the end of payments): intermediaries net ``fee`` or 0,
    never < 0; an honest sender pays at most ``a_1``, and only if the receiver got ``v``.

    With ``graph`` and ``before`` (``graph.holdings()`` at the start), also checks each honest
    party's actual holdings against what the records account for (catches ledger tampering and
    stale closes). Intermediaries may end above ``fee`` (paid, did not pay on): that is an
    atomicity failure, reported by :func:`check_atomicity`, not a loss.
    """
    out: list[Violation] = []
    expected: dict[str, int] = {}
    for rec in records:
        outcomes = rec.observed_outcomes(graph)
        nets = rec.net_changes(outcomes)
        for k, party in enumerate(rec.parties):
            if party not in rec.honest:
                continue
            expected[party] = expected.get(party, 0) + nets[k]
            floor = -rec.amounts[0] if k == 0 else 0  # the sender may pay a_1, nobody else pays
            if nets[k] < floor:
                out.append(Violation("balance_security", f"payment {rec.pid}: honest {party} "
                                     f"(u_{k}) lost {-nets[k]}"))
        if rec.parties[0] in rec.honest and outcomes[0] == SETTLED and outcomes[-1] != SETTLED:
            out.append(Violation("balance_security", f"payment {rec.pid}: honest sender "
                                 f"{rec.parties[0]} paid but receiver {rec.parties[-1]} "
                                 f"was not paid (last hop {outcomes[-1]})"))
    if graph is not None and before is not None:
        now = graph.holdings()
        for party, exp in expected.items():
            actual = now.get(party, 0) - before.get(party, 0)
            if actual < exp:
                out.append(Violation("balance_security", f"honest {party}: holdings changed by "
                                     f"{actual}, payments account for {exp}"))
    return out


def check_atomicity(records: Iterable[PaymentRecord],
                    graph: ChannelGraph | None = None) -> list[Violation]:
    """Per payment, the settled hops are all or none, over hops whose channel is correct or
    has an honest endpoint (spec §6.2 item 3)."""
    out = []
    for rec in records:
        outcomes = rec.observed_outcomes(graph)
        considered = [i for i, c in enumerate(rec.channels)
                      if rec.correct_channels is None or c in rec.correct_channels
                      or rec.parties[i] in rec.honest or rec.parties[i + 1] in rec.honest]
        settled = [i + 1 for i in considered if outcomes[i] == SETTLED]
        if settled and len(settled) < len(considered):
            out.append(Violation("atomicity", f"payment {rec.pid}: hops {settled} settled, "
                                 f"outcomes {outcomes}"))
    return out


def check_termination(records: Iterable[PaymentRecord] = (), graph: ChannelGraph | None = None,
                      honest: Collection[str] = (), *, now: float | None = None,
                      grace: float = 0.0) -> list[Violation]:
    """Every lock with an honest endpoint is resolved.

    Records (at quiescence, ``now=None`` only): a hop still ``locked`` with an honest
    endpoint. Ledger (``graph``): any pending
    lock whose payer or payee is in ``honest``. With ``now`` (SyncPCN), only ledger locks with
    ``deadline + grace <= now`` count; without it (quiescence, PSyncPCN), all pending ones do.
    """
    out = []
    for rec in records:
        for i, outcome in enumerate(rec.observed_outcomes(graph)):
            ends = (rec.parties[i], rec.parties[i + 1])
            if outcome == LOCKED and any(p in rec.honest for p in ends) and now is None:
                out.append(Violation("termination", f"payment {rec.pid}: hop {i + 1} on "
                                     f"{rec.channels[i]} still locked"))
    if graph is not None:
        honest_set = frozenset(honest)
        for cid, ch in graph.channels.items():
            for lock_id, lk in sorted(ch.locks.items()):
                if lk.payer not in honest_set and lk.payee not in honest_set:
                    continue
                due = now is None or (lk.deadline is not None and lk.deadline + grace <= now)
                if due:
                    out.append(Violation("termination", f"channel {cid}: lock {lock_id} of "
                                         f"{lk.payer}->{lk.payee} unresolved (deadline "
                                         f"{lk.deadline}, now {now})"))
    return out


def check_qc_uniqueness(qcs: Iterable[QuorumCertificate], registry: KeyRegistry,
                        committees: Mapping[str, Committee]) -> list[Violation]:
    """No valid COMMIT-QC and ABORT-QC for the same ``(pid, cid)``; ``committees`` by cid."""
    seen: dict[tuple, str] = {}
    reported: set[tuple] = set()  # membership only
    out = []
    for qc in qcs:
        st = qc.statement
        if st.decision not in ("COMMIT", "ABORT") or st.cid not in committees:
            continue
        if not committees[st.cid].verify_qc(qc, registry):
            continue
        key = (st.pid, st.cid)
        if seen.setdefault(key, st.decision) != st.decision and key not in reported:
            reported.add(key)
            out.append(Violation("qc_uniqueness", f"payment {st.pid!r} channel {st.cid}: "
                                 "valid COMMIT-QC and ABORT-QC"))
    return out


def check_no_equivocation(votes: Iterable[SignedStatement], correct: Collection[str],
                          registry: KeyRegistry) -> list[Violation]:
    """No correct member validly signed two different statements for one slot."""
    correct_set = frozenset(correct)
    first: dict[tuple, SignedStatement] = {}
    out = []
    for v in votes:
        if v.signer not in correct_set or not v.verify(registry):
            continue
        key = (v.signer, v.statement.slot())
        prior = first.setdefault(key, v)
        if prior.statement != v.statement:
            out.append(Violation("equivocation", f"correct member {v.signer} signed "
                                 f"{prior.statement} and {v.statement}"))
    return out


def check_channel_safety(graph: ChannelGraph, acks: Iterable[SignedStatement],
                         committees: Mapping[str, Committee], honest_members: Collection[str],
                         registry: KeyRegistry, ack_quorum: int | None = None) -> list[Violation]:
    """Every closed channel closed at ``seq >= h``, where ``h`` is the highest seq ACKed (by
    valid Brick ACKs) by at least ``ack_quorum`` honest members.

    Default ``ack_quorum = f+1``: with ``n = 3f+1`` and ``2f+1`` close claims, ``f+1`` honest
    holders of ``h`` guarantee an honest claimant of ``>= h`` ([R], from Brick's thresholds).
    """
    honest_set = frozenset(honest_members)
    top: dict[str, dict[str, int]] = {}
    for ack in acks:
        st = ack.statement
        com = committees.get(st.cid or "")
        if (st.protocol, st.phase) != (BRICK, "ACK") or com is None:
            continue
        if ack.signer in honest_set and com.is_member(ack.signer) and ack.verify(registry):
            per = top.setdefault(st.cid, {})
            per[ack.signer] = max(per.get(ack.signer, -1), st.seq)
    out = []
    for cid, ch in graph.channels.items():
        if ch.is_open or cid not in top or cid not in committees:
            continue
        q = committees[cid].f + 1 if ack_quorum is None else ack_quorum
        seqs = sorted(top[cid].values(), reverse=True)
        if len(seqs) >= q and ch.closed_seq is not None and ch.closed_seq < seqs[q - 1]:
            out.append(Violation("channel_safety", f"channel {cid} closed at seq "
                                 f"{ch.closed_seq} < registered seq {seqs[q - 1]}"))
    return out


def check_record_consistency(records: Iterable[PaymentRecord],
                             graph: ChannelGraph) -> list[Violation]:
    """Reported hop outcomes agree with the ledger."""
    out = []
    for rec in records:
        seen = rec.observed_outcomes(graph)
        if seen != list(rec.outcomes):
            out.append(Violation("record", f"payment {rec.pid}: reported {rec.outcomes}, "
                                 f"ledger {seen}"))
    return out
