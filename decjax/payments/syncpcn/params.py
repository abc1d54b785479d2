"""SyncPCN parameters (Δ, slack, deadlines, thresholds), naming helpers and message cost."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from decjax.payments.crypto import digest
from decjax.payments.errors import ConfigError
from decjax.payments.syncpcn.privacy import PerHopLocks, SingleHashLock

PROTOCOL = "syncpcn"


@dataclasses.dataclass(frozen=True)
class SyncParams:
    """Protocol parameters (spec §3.1). ``None`` means the documented default.

    Attributes:
      delta: Δ, the known delay bound. proc: local processing bound.
      hop_slack: δ >= 3Δ + proc (default 3Δ + proc). dispute_lead: δ_d, default the middle of
        the allowed range ``(Δ + proc, δ - Δ - proc]``. tau_r: τ_R, default ``3l(Δ + proc) + δ_d
        + Δ``. fee: fee per intermediary (int or party -> int). n, ack_quorum, claim_quorum:
        committee size and quorums (defaults 3f+1, 2f+1, 2f+1). private: per-hop locks (else one
        hash lock on every hop).
    """

    delta: float = 1.0
    proc: float = 0.0
    hop_slack: float | None = None
    dispute_lead: float | None = None
    tau_r: float | None = None
    fee: int | Mapping[str, int] = 1
    n: int | None = None
    ack_quorum: int | None = None
    claim_quorum: int | None = None
    private: bool = True

    def __post_init__(self) -> None:
        if not (self.delta > 0 and math.isfinite(self.delta)) or not self.proc >= 0:
            raise ConfigError(f"need Δ > 0 and proc >= 0, got Δ={self.delta}, proc={self.proc}")
        need = 3 * self.delta + self.proc
        if self.slack < need - 1e-12:
            raise ConfigError(f"hop slack δ={self.slack} must be >= 3Δ + proc = {need}")
        lo, hi = self.delta + self.proc, self.slack - self.delta - self.proc
        if not lo < self.lead <= hi:
            raise ConfigError(f"dispute lead δ_d={self.lead} must lie in (Δ + proc, δ - Δ - "
                              f"proc] = ({lo}, {hi}]")

    @property
    def slack(self) -> float:
        return 3 * self.delta + self.proc if self.hop_slack is None else float(self.hop_slack)

    @property
    def lead(self) -> float:
        if self.dispute_lead is not None:
            return float(self.dispute_lead)
        return (self.delta + self.proc + self.slack - self.delta - self.proc) / 2

    def receiver_slack(self, hops: int) -> float:
        if self.tau_r is not None:
            return float(self.tau_r)
        return 3 * hops * (self.delta + self.proc) + self.lead + self.delta

    def fee_of(self, party: str) -> int:
        return self.fee.get(party, 0) if isinstance(self.fee, Mapping) else self.fee

    def thresholds(self, f: int) -> tuple[int, int, int]:
        """``(n, q_s, q_c)`` for fault bound ``f``, validated (safety needs ``n >= 3f+1``)."""
        n = 3 * f + 1 if self.n is None else self.n
        q_s = 2 * f + 1 if self.ack_quorum is None else self.ack_quorum
        q_c = 2 * f + 1 if self.claim_quorum is None else self.claim_quorum
        if not (isinstance(f, int) and f >= 0 and n >= 3 * f + 1):
            raise ConfigError(f"committee size n={n} not allowed for f={f}: need n >= 3f+1")
        if not (2 * q_c - n > f and q_c <= n - f and q_s <= n - f and q_s + q_c - n > f):
            raise ConfigError(f"quorums q_s={q_s}, q_c={q_c} not allowed for n={n}, f={f}: need "
                              "q_c, q_s <= n-f, 2q_c-n > f and q_s+q_c-n > f")
        return n, q_s, q_c

    def scheme(self) -> PerHopLocks | SingleHashLock:
        return PerHopLocks() if self.private else SingleHashLock()


def optimistic_messages(hops: int, n: int) -> int:
    """INVOICE + per hop: ADD, COSIGN, n REGISTER, n ACK for the lock, the same for FULFILL."""
    return 1 + 2 * hops * (2 + 2 * n)


def committee_name(cid: str) -> str:
    return f"W[{cid}]"


def member_id(cid: str, k: int) -> str:
    return f"{committee_name(cid)}.m{k}"


def invoice_tag(pid: str) -> bytes:
    return digest(PROTOCOL, "invoice", pid)[:16]
