"""PSyncPCN: multi-hop payments over an asynchronous network with correct channels.

Each channel ``c_i`` has a committee ``W_i`` of ``n = 3f+1`` members (at most ``f`` faulty).
Committees successively take over the obligation to finish a payment and return the decision as
quorum certificates (QCs, ``2f+1`` member signatures). There are no timeouts anywhere.

Protocol as realised here (spec §2.5; every step is a reconstruction [R] of the abstract):

1. INIT (sender-collected route consent). ``S`` fixes the route, amounts ``a_i`` and
   ``pid = H(nonce || route commitment)``, sends ``CONSENT_REQ`` to ``u_1..u_l`` and collects
   ``CONSENT``: each ``u_k`` co-signs ``COND_k`` (payee) and ``COND_{k+1}`` (payer), ``S`` signs
   ``COND_1``, and ``R`` pre-signs ``ACCEPT``. ``COND_i`` says "resolve only by DECISION-QC(pid)";
   that co-signature is the delegation to ``W_i``. Only then does ``S`` send ``INIT`` to ``W_1``.
   A silent party stalls only this stage, before anything is locked; a lying one (bad
   signature) makes ``S`` refuse to start. After INIT no party is consulted again.
2. FORWARD (leaderless vote forwarding). A member of ``W_i`` triggered by ``INIT`` (``i=1``) or
   by a LOCK-QC of ``W_{i-1}`` registers the lock (see 5) and, if it holds, signs
   ``LOCK(pid, c_i)`` and sends it to every member of ``W_{i+1}`` (``n^2`` messages per hop).
   Members of ``W_{i+1}`` assemble LOCK-QC_i themselves, so no intra-committee round and no
   collector is needed, and each message carries one signature (certificate bytes are
   ``O(l n^2 kappa)``, not ``O(l n^3 kappa)``). After voting LOCK a correct member never signs
   a decision of its own: it waits for a DECISION-QC from ``W_{i+1}`` (delegation monotonicity).
3. DECIDE. ``W_l`` signs COMMIT once its lock holds (``R``'s acceptance is pre-signed and was
   checked at registration). Abort sources, all deterministic: the first committee whose
   registration fails (invalid/forged ``COND_i`` or ``ACCEPT``, insufficient free balance,
   closed channel) signs ABORT. A correct member signs at most one decision per ``(pid, cid)``.
4. BACKWARD. Members of ``W_i`` send their DECISION vote to every member of ``W_{i-1}`` and a
   NOTIFY copy to the endpoints ``u_{i-1}, u_i``. A member of ``W_{i-1}`` that assembles a
   DECISION-QC of ``W_i`` signs the same decision for ``c_{i-1}`` and goes on.
5. Ledger (modelling choice): the committee acts as its channel's arbiter. A
   :class:`ChannelArbiter` holds the channel's registered state: the first valid registration of
   ``(pid, c_i)`` locks ``a_i`` on the ledger or records why it cannot, and every member reads
   that one result (Brick-style registration is consistent with at most ``f`` faulty members;
   the ``split`` adversary models its failure with ``f+1``). Settle/refund is applied exactly
   once, when ``2f+1`` members of ``W_i`` registered the same decision (the QC forms in the
   channel's registry). CLOSE is refused while a payment is pending on the channel.
6. "P" is read as "partially synchronous / asynchronous-safe": safety never depends on timing,
   termination is "eventually" under a fair scheduler. Unconfirmed [R].

Message count of one payment that commits (``j = l``) or aborts at hop ``j`` (exact, see
:func:`message_formula`): ``2l + n + 2(j-1) n^2 + 2 j n``. Latency: ``c_1`` resolves after
``2l + 1`` message delays (2 consent + INIT + ``l-1`` forward + ``l-1`` backward); endpoints
learn one delay later.

Examples:
    >>> from decjax.payments.graph import ChannelGraph
    >>> g = ChannelGraph()
    >>> _ = g.add_channel("s", "i", 50, 50, cid="c1"); _ = g.add_channel("i", "r", 50, 50, cid="c2")
    >>> run = run_psyncpcn(g, [PaymentSpec(("s", "i", "r"), 10, (1,))], seed=0, signer="hmac")
    >>> run.status, run.records[0].outcomes, run.check()
    (['committed'], ['settled', 'settled'], [])
"""

from __future__ import annotations

from decjax.payments.psyncpcn.adversary import (
    PARTY_MODES,
    Adversary,
    FixedDelay,
)
from decjax.payments.psyncpcn.messages import (
    ABORT,
    COMMIT,
    DELEGATION,
    PROTO,
    Consent,
    ConsentRequest,
    Init,
    PaymentSpec,
    Route,
    SignedRoute,
    Vote,
    consent_statements,
)
from decjax.payments.psyncpcn.nodes import (
    ChannelArbiter,
    PsyncMember,
    PsyncParty,
)
from decjax.payments.psyncpcn.run import (
    Latency,
    PsyncRun,
    PsyncSimulation,
    check_delegation,
    message_formula,
    run_psyncpcn,
)

__all__ = [
    "ABORT",
    "Adversary",
    "COMMIT",
    "ChannelArbiter",
    "Consent",
    "ConsentRequest",
    "DELEGATION",
    "FixedDelay",
    "Init",
    "Latency",
    "PARTY_MODES",
    "PROTO",
    "PaymentSpec",
    "PsyncMember",
    "PsyncParty",
    "PsyncRun",
    "PsyncSimulation",
    "Route",
    "SignedRoute",
    "Vote",
    "check_delegation",
    "consent_statements",
    "message_formula",
    "run_psyncpcn",
]
