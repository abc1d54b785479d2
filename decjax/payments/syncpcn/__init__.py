"""SyncPCN: multi-hop payments over committee-guarded channels in a synchronous network.

A faithful implementation of the spec's reconstruction (``specs/payments.md`` §2.4); the paper's
own algorithm was not available, so every step below is [R]. In particular these rest on
reconstructions, not on the paper: the thresholds (committee size ``n``, fault bound ``f``, ACK
quorum ``q_s``, claim/verdict quorum ``q_c``; defaults ``n = 3f+1``, ``q_s = q_c = 2f+1``), the
per-hop slack ``δ >= 3Δ + proc`` and the dispute lead ``δ_d``, the message names (INVOICE, ADD,
FULFILL, COSIGN, REGISTER, ACK, CLAIM, CONCEDE, REFUND, VERDICT), and the privacy mechanism
(AMHL-style per-hop locks and a Sphinx-like onion, :mod:`decjax.payments.syncpcn.privacy`).

Protocol, per hop ``c_i = (u_{i-1}, u_i)`` with committee ``W_i``:

* SETUP: the receiver signs ``INVOICE(tag, g^x, v)``; the sender derives per-hop conditions,
  amounts ``a_i = a_{i+1} + fee(u_i)``, deadlines ``T_l = t0 + τ_R``, ``T_i = T_{i+1} + δ``.
* LOCK: ``u_{i-1} -> u_i: ADD`` with its signature on the new state; ``u_i`` checks fee, slack
  and onion, co-signs (``COSIGN``), ``REGISTER`` s ``(cid, seq, H(state))`` with every member of
  ``W_i`` and forwards only after ``q_s`` ``ACK`` s (Brick-style: members keep the max seq).
* UNLOCK: ``u_i -> u_{i-1}: FULFILL(x_i)``; the payer co-signs the settled state, the payee
  registers it, the payer derives ``x_{i-1}`` and repeats upstream.
* DISPUTE: if the payer has not co-signed by ``T_i - δ_d``, the payee sends ``CLAIM`` (latest
  co-signed state, its opening, ``x_i``) to all of ``W_i``; a member logs SETTLED when
  ``now < T_i``, the preimage matches and nothing else is logged, and
  sends a signed ``VERDICT`` to both endpoints (the payer's copy pushes ``x_i`` upstream). A
  settling dispute may show an older co-signed state holding the lock (concurrent updates may
  race it; settling never conflicts with a newer state), a REFUND must show the latest. At
  ``T_i + Δ`` a pending lock's payer sends ``CONCEDE`` (it learnt ``x_i``: settle) or ``REFUND``;
  members sign REFUNDED at ``now >= T_i`` (payee requests: ``T_i + 3Δ``) if nothing else is
  logged. ``q_c`` matching verdicts resolve the ledger lock. CONCEDE is an addition [R]: it
  resolves locks left split by a claim sent just before ``T_i`` (spec §6.3 timing attack).
* CLOSE: cooperative, or unilateral via :func:`~decjax.payments.registration.resolve_close`
  (max registered seq, stale member claims give fraud proofs), re-applying verdict resolutions.

Modelling choices (also [R]): both endpoints share one :class:`ChannelSession` (their copies of
the channel) and serialize updates, a proposal unanswered within Δ is dropped; the ledger
(:class:`~decjax.payments.channels.Channel`) is the agreed state, so a co-signature is the
counterparty applying the update; discrete-log locks are checked by parties and members, not by
the ledger (its ``hashlock`` is None in private mode); the payee-side REFUND lag ``3Δ``, the
REFUND retry on a newer state, and payer CONCEDE are additions to the spec's steps.

Optimistic cost: ``1 + 2l(k_u + 2n)`` messages with ``k_u = 2`` (see :func:`optimistic_messages`),
latency ``(4l + 1)Δ`` when every delay is exactly Δ.

Examples:
    >>> from decjax.payments.graph import ChannelGraph
    >>> g = ChannelGraph()
    >>> _ = g.add_channel("s", "i", 50, 50); _ = g.add_channel("i", "r", 50, 50)
    >>> run = run_syncpcn(g, [("s", "r", 10)], seed=0, signer="hmac")
    >>> run.records[0].outcomes, run.violations()
    (['settled', 'settled'], [])
"""

from __future__ import annotations

from decjax.payments.syncpcn.adversary import (
    Adversary,
    BadOnion,
    Colluding,
    Griefer,
    Honest,
    LateClaimer,
    NoFee,
    PartyBehaviour,
    RefundCheater,
    Replayer,
    ShortDeadlines,
    Silent,
    Stingy,
    WormholeEnd,
    WormholeStart,
    flip_verdict,
)
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
    opening_digest,
    verdict_statement,
)
from decjax.payments.syncpcn.params import (
    PROTOCOL,
    SyncParams,
    committee_name,
    invoice_tag,
    member_id,
    optimistic_messages,
)
from decjax.payments.syncpcn.party import (
    InLock,
    OutLock,
    Party,
    Plan,
)
from decjax.payments.syncpcn.privacy import (
    ID_BYTES,
    MAX_HOPS,
    HopPayload,
    OnionKeys,
    PerHopLocks,
    SingleHashLock,
    build_onion,
    check_view_privacy,
    lock_id_for,
    peel_onion,
)
from decjax.payments.syncpcn.run import (
    CloseResult,
    HopInfo,
    Resolution,
    SyncRun,
    check_deadline_discipline,
    run_syncpcn,
)
from decjax.payments.syncpcn.session import (
    ChannelSession,
    LockOp,
    SettleOp,
)
from decjax.payments.syncpcn.warden import (
    Warden,
)

__all__ = [
    "Ack",
    "Add",
    "Adversary",
    "BadOnion",
    "ChannelSession",
    "CloseResult",
    "CoSigned",
    "Colluding",
    "Cosign",
    "Dispute",
    "Fulfill",
    "Griefer",
    "Honest",
    "HopInfo",
    "HopPayload",
    "ID_BYTES",
    "InLock",
    "Invoice",
    "LateClaimer",
    "LockOp",
    "MAX_HOPS",
    "NoFee",
    "OnionKeys",
    "OutLock",
    "PROTOCOL",
    "Party",
    "PartyBehaviour",
    "PerHopLocks",
    "Plan",
    "RefundCheater",
    "Register",
    "Replayer",
    "Resolution",
    "SettleOp",
    "ShortDeadlines",
    "Silent",
    "SingleHashLock",
    "Stingy",
    "SyncParams",
    "SyncRun",
    "Verdict",
    "Warden",
    "WormholeEnd",
    "WormholeStart",
    "build_onion",
    "check_deadline_discipline",
    "check_view_privacy",
    "committee_name",
    "flip_verdict",
    "invoice_tag",
    "lock_id_for",
    "member_id",
    "opening_digest",
    "optimistic_messages",
    "peel_onion",
    "run_syncpcn",
    "verdict_statement",
]
