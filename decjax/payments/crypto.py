"""Signatures, hash locks and quorum certificates for the payment simulation.

* :class:`Statement`: what parties and committee members sign. Its canonical encoding covers a
  domain tag and ``(protocol, phase, pid, cid, seq, decision, state_hash, extra)``, so a
  signature for one payment, channel, sequence number or phase never verifies for another.
* Signers: :class:`Ed25519Signer` (real RFC 8032 signatures via ``cryptography``; deterministic,
  keys derived from a seed) and :class:`HmacSigner` (keyed BLAKE2b, 64-byte tags, fast; its
  "public key" is the secret itself, so it models an ideal PKI oracle, not real security).
* :class:`KeyRegistry`: the PKI, party id -> verifier. ``registry.enroll(pid)`` creates a key
  pair deterministically from the registry seed.
* :class:`QuorumCertificate`: a statement plus ``(member_id, signature)`` pairs; valid when at
  least ``threshold`` distinct members of the committee signed it (duplicates count once,
  non-members and bad signatures not at all).

Examples:
    >>> reg = KeyRegistry(seed=0)
    >>> signers = [reg.enroll(f"w{i}") for i in range(4)]
    >>> st = Statement("psync", "DECISION", pid="p1", cid="c1", decision="COMMIT")
    >>> qc = QuorumCertificate.from_votes(s.vote(st) for s in signers[:3])
    >>> qc.verify(reg, [f"w{i}" for i in range(4)], threshold=3)
    True
    >>> x, h = hashlock(b"seed"); check_preimage(x, h)
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import struct
from collections.abc import Collection, Iterable
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from decjax.payments.errors import CryptoError, UnknownParty
from decjax.payments.network import wire_size

DOMAIN = b"decjax.payments/v1"
SIG_BYTES = 64
HASH_BYTES = 32


def encode(value: Any) -> bytes:
    """Canonical, injective, type-tagged encoding of plain values (None/bool/int/float/str/bytes,
    tuples/lists, and :class:`Statement`)."""
    if isinstance(value, Statement):
        return encode(value.fields())
    if value is None:
        return b"N"
    if isinstance(value, bool):
        return b"T" if value else b"F"
    if isinstance(value, int):
        raw = value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)
        return b"I" + struct.pack(">I", len(raw)) + raw
    if isinstance(value, float):
        return b"D" + struct.pack(">d", value)
    if isinstance(value, str):
        raw = value.encode()
        return b"S" + struct.pack(">I", len(raw)) + raw
    if isinstance(value, bytes | bytearray):
        return b"B" + struct.pack(">I", len(value)) + bytes(value)
    if isinstance(value, tuple | list):
        return b"L" + struct.pack(">I", len(value)) + b"".join(encode(v) for v in value)
    raise CryptoError(f"cannot canonically encode a value of type {type(value).__name__}")


def digest(*parts: Any) -> bytes:
    """SHA-256 of the canonical encoding of ``parts`` (state hashes, payment ids)."""
    return hashlib.sha256(encode(parts)).digest()


def hashlock(seed: bytes | None = None, rng: Any = None) -> tuple[bytes, bytes]:
    """A hash lock ``(x, h = sha256(x))`` with a 32-byte preimage ``x``.

    ``x`` comes from ``sha256(seed)`` or ``rng.getrandbits(256)`` so runs stay deterministic.
    """
    if (seed is None) == (rng is None):
        raise CryptoError("hashlock needs exactly one of seed= or rng=")
    x = hashlib.sha256(seed).digest() if seed is not None else rng.getrandbits(256).to_bytes(32)
    return x, hashlib.sha256(x).digest()


def check_preimage(x: bytes, h: bytes) -> bool:
    return isinstance(x, bytes) and hmac.compare_digest(hashlib.sha256(x).digest(), h)


@dataclasses.dataclass(frozen=True)
class Statement:
    """A signable protocol statement; unused fields stay None.

    ``slot()`` is the part a correct signer commits to once: two different statements with the
    same slot are an equivocation (e.g. COMMIT and ABORT for one ``(pid, cid)``).
    """

    protocol: str
    phase: str
    pid: str | bytes | None = None
    cid: str | None = None
    seq: int | None = None
    decision: str | None = None
    state_hash: bytes | None = None
    extra: tuple = ()

    def fields(self) -> tuple:
        return (DOMAIN, self.protocol, self.phase, self.pid, self.cid, self.seq, self.decision,
                self.state_hash, tuple(self.extra))

    def slot(self) -> tuple:
        return (self.protocol, self.phase, self.pid, self.cid, self.seq)

    def replace(self, **changes: Any) -> Statement:
        return dataclasses.replace(self, **changes)


def _message(statement: Statement | tuple) -> bytes:
    body = statement.fields() if isinstance(statement, Statement) else (DOMAIN, *statement)
    return encode(body)


class Verifier(Protocol):
    def verify(self, message: bytes, signature: bytes) -> bool: ...


class Signer(Protocol):
    """Holds one party's signing key."""

    party: str

    def sign(self, statement: Statement | tuple) -> bytes: ...

    def vote(self, statement: Statement) -> SignedStatement: ...

    def verifier(self) -> Verifier: ...


@dataclasses.dataclass(frozen=True)
class SignedStatement:
    """``statement`` signed by ``signer`` (a vote, an ACK, a claim)."""

    statement: Statement
    signer: str
    signature: bytes

    def verify(self, registry: KeyRegistry) -> bool:
        return registry.verify(self.signer, self.statement, self.signature)


class _SignerBase:
    party: str

    def sign(self, statement: Statement | tuple) -> bytes:
        raise NotImplementedError

    def vote(self, statement: Statement) -> SignedStatement:
        return SignedStatement(statement, self.party, self.sign(statement))


class _Ed25519Verifier:
    def __init__(self, public: Ed25519PublicKey):
        self.public = public
        self.public_bytes = public.public_bytes(Encoding.Raw, PublicFormat.Raw)

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            self.public.verify(signature, message)
        except (InvalidSignature, TypeError, ValueError):
            return False
        return True


class Ed25519Signer(_SignerBase):
    """Real Ed25519 key pair; the private key is ``sha256(seed_bytes)``, so runs replay exactly."""

    def __init__(self, party: str, seed_bytes: bytes):
        self.party = party
        self._key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed_bytes).digest())

    def sign(self, statement: Statement | tuple) -> bytes:
        return self._key.sign(_message(statement))

    def verifier(self) -> Verifier:
        return _Ed25519Verifier(self._key.public_key())


class _HmacVerifier:
    def __init__(self, key: bytes):
        self.key = key

    def verify(self, message: bytes, signature: bytes) -> bool:
        tag = hashlib.blake2b(message, key=self.key, digest_size=SIG_BYTES).digest()
        return isinstance(signature, bytes) and hmac.compare_digest(tag, signature)


class HmacSigner(_SignerBase):
    """Keyed BLAKE2b "signature" (64 bytes, same size as Ed25519), ~15x faster; simulation only."""

    def __init__(self, party: str, seed_bytes: bytes):
        self.party = party
        self._key = hashlib.sha256(b"hmac:" + seed_bytes).digest()

    def sign(self, statement: Statement | tuple) -> bytes:
        return hashlib.blake2b(_message(statement), key=self._key, digest_size=SIG_BYTES).digest()

    def verifier(self) -> Verifier:
        return _HmacVerifier(self._key)


SCHEMES = {"ed25519": Ed25519Signer, "hmac": HmacSigner}


class KeyRegistry:
    """PKI: party id -> verifier. ``enroll`` derives keys from ``(seed, party)``.

    Args:
      seed: key-derivation seed; the same seed gives the same keys and signatures.
      scheme: ``"ed25519"`` (default) or ``"hmac"``.
    """

    def __init__(self, seed: int = 0, scheme: str = "ed25519"):
        if scheme not in SCHEMES:
            raise CryptoError(f"unknown signature scheme {scheme!r}; allowed: {sorted(SCHEMES)}")
        self.seed, self.scheme = seed, scheme
        self._verifiers: dict[str, Verifier] = {}

    def enroll(self, party: str, scheme: str | None = None) -> Signer:
        """Create and register a key pair for ``party``; returns its signer."""
        scheme = scheme or self.scheme
        if scheme not in SCHEMES:
            raise CryptoError(f"unknown signature scheme {scheme!r}; allowed: {sorted(SCHEMES)}")
        signer = SCHEMES[scheme](party, encode((DOMAIN, "key", self.seed, party)))
        self.register(party, signer.verifier())
        return signer

    def register(self, party: str, verifier: Verifier) -> None:
        if party in self._verifiers:
            raise CryptoError(f"party {party!r} already has a registered key")
        self._verifiers[party] = verifier

    def __contains__(self, party: object) -> bool:
        return party in self._verifiers

    def parties(self) -> tuple[str, ...]:
        return tuple(sorted(self._verifiers))

    def verifier(self, party: str) -> Verifier:
        try:
            return self._verifiers[party]
        except KeyError:
            raise UnknownParty(f"no key registered for party {party!r}") from None

    def verify(self, party: str, statement: Statement | tuple, signature: bytes) -> bool:
        """True iff ``signature`` is ``party``'s valid signature on ``statement``."""
        verifier = self._verifiers.get(party)
        return verifier is not None and verifier.verify(_message(statement), signature)


@dataclasses.dataclass(frozen=True)
class QuorumCertificate:
    """A statement and the ``(member_id, signature)`` pairs collected for it."""

    statement: Statement
    signatures: tuple[tuple[str, bytes], ...]

    @classmethod
    def from_votes(cls, votes: Iterable[SignedStatement]) -> QuorumCertificate:
        """Bundle votes on one statement (sorted by member id, so the QC is canonical)."""
        votes = list(votes)
        if not votes:
            raise CryptoError("a quorum certificate needs at least one vote")
        statement = votes[0].statement
        if any(v.statement != statement for v in votes):
            raise CryptoError("votes in one quorum certificate must sign the same statement")
        sigs = sorted((v.signer, v.signature) for v in votes)
        return cls(statement, tuple(sigs))

    def valid_signers(self, registry: KeyRegistry, members: Collection[str]) -> tuple[str, ...]:
        """Distinct committee members with a valid signature, sorted."""
        member_set = frozenset(members)
        seen: set[str] = set()
        for member, sig in self.signatures:
            if member in member_set and member not in seen:
                if registry.verify(member, self.statement, sig):
                    seen.add(member)
        return tuple(sorted(seen))

    def verify(self, registry: KeyRegistry, members: Collection[str], threshold: int) -> bool:
        """At least ``threshold`` distinct members signed (e.g. ``2f+1`` of ``3f+1``)."""
        if threshold < 1:
            raise CryptoError(f"threshold must be >= 1, got {threshold}")
        return len(self.valid_signers(registry, members)) >= threshold

    def wire_size(self) -> int:
        return wire_size(self.statement) + sum(len(m.encode()) + len(s)
                                               for m, s in self.signatures)
