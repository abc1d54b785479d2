"""Committee-based multi-hop payment channel networks (SyncPCN / PSyncPCN), simulated.

Pure Python, no JAX: a deterministic discrete-event core (events, network), cryptography
(signatures, hash locks, quorum certificates), channels and the channel graph, committees with
pluggable adversary behaviours, Brick-style registration, and invariant checkers; the two
protocols (:mod:`~decjax.payments.syncpcn`, :mod:`~decjax.payments.psyncpcn`, each with its own
adversaries), the impossibility demonstration (:mod:`~decjax.payments.impossibility`) and the
settlement of training runs (:mod:`~decjax.payments.settle`). See ``specs/payments.md``; items
marked [R] there are reconstructions, not the paper's text, and each protocol's docstring lists
the steps that rest on them.
"""

from decjax.payments.channels import (
    ABSENT,
    LOCKED,
    REFUNDED,
    SETTLED,
    Channel,
    Lock,
    check_amount,
    hop_amounts,
)
from decjax.payments.checkers import (
    PaymentRecord,
    Violation,
    check_atomicity,
    check_balance_security,
    check_channel_safety,
    check_conservation,
    check_no_equivocation,
    check_qc_uniqueness,
    check_record_consistency,
    check_termination,
)
from decjax.payments.committee import (
    Behaviour,
    Committee,
    CorrectBehaviour,
    Crashed,
    Equivocating,
    Member,
    flip_decision,
)
from decjax.payments.crypto import (
    Ed25519Signer,
    HmacSigner,
    KeyRegistry,
    QuorumCertificate,
    SignedStatement,
    Signer,
    Statement,
    check_preimage,
    digest,
    encode,
    hashlock,
)
from decjax.payments.errors import (
    ChannelClosed,
    ConfigError,
    CryptoError,
    DuplicateLock,
    InsufficientBalance,
    InvalidAmount,
    LockError,
    NoRoute,
    PaymentError,
    SimulationError,
    UnknownChannel,
    UnknownLock,
    UnknownParty,
)
from decjax.payments.events import Node, Simulator, TraceEvent
from decjax.payments.graph import ChannelGraph
from decjax.payments.impossibility import demonstrate as demonstrate_impossibility
from decjax.payments.network import (
    AsyncNetwork,
    Envelope,
    MessageStats,
    Network,
    RandomScheduler,
    Scheduler,
    SyncNetwork,
    wire_size,
)
from decjax.payments.psyncpcn import PaymentSpec, PsyncRun, run_psyncpcn
from decjax.payments.registration import (
    CloseDecision,
    FraudProof,
    RegistrationStore,
    find_fraud,
    resolve_close,
    state_statement,
)
from decjax.payments.settle import (
    NodePayment,
    Settlement,
    SettlementError,
    WorkLogError,
    read_work,
    settle_run,
    settlement_graph,
)
from decjax.payments.syncpcn import SyncParams, SyncRun, run_syncpcn

__all__ = [
    "NodePayment", "PaymentSpec", "PsyncRun", "Settlement", "SettlementError", "SyncParams",
    "SyncRun", "WorkLogError", "demonstrate_impossibility", "read_work", "run_psyncpcn",
    "run_syncpcn", "settle_run", "settlement_graph",
    "ABSENT", "LOCKED", "REFUNDED", "SETTLED",
    "AsyncNetwork", "Behaviour", "Channel", "ChannelClosed", "ChannelGraph", "CloseDecision",
    "Committee", "ConfigError", "CorrectBehaviour", "Crashed", "CryptoError", "DuplicateLock",
    "Ed25519Signer", "Envelope", "Equivocating", "FraudProof", "HmacSigner",
    "InsufficientBalance", "InvalidAmount", "KeyRegistry", "Lock", "LockError", "Member",
    "MessageStats", "Network", "NoRoute", "Node", "PaymentError", "PaymentRecord",
    "QuorumCertificate", "RandomScheduler", "RegistrationStore", "Scheduler", "SignedStatement",
    "Signer", "SimulationError", "Simulator", "Statement", "SyncNetwork", "TraceEvent",
    "UnknownChannel", "UnknownLock", "UnknownParty", "Violation", "check_amount",
    "check_atomicity", "check_balance_security", "check_channel_safety", "check_conservation",
    "check_no_equivocation", "check_preimage", "check_qc_uniqueness", "check_record_consistency",
    "check_termination", "digest", "encode", "find_fraud", "flip_decision", "hashlock",
    "hop_amounts", "resolve_close", "state_statement", "wire_size",
]
