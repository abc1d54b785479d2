"""SyncPCN privacy layer: unlinkable per-hop locks, an onion packet, and the privacy-view check.

Everything here is the spec's reconstruction [R] (§2.4 "privacy variant", §6.2 item 9); the
paper's own mechanism is unknown (§5.2 item 4).

**Per-hop locks** (:class:`PerHopLocks`, AMHL-style [V: AMHL's homomorphic one-way function]).
A lock condition is ``h = g^s`` in the order-``q`` subgroup of ``Z_p^*`` (``p = 2q + 1`` a safe
prime), and its preimage is the exponent ``s``. The receiver's invoice is ``g^x``. The sender draws
one random tweak ``r_i`` per hop and sets ``h_l = g^x * g^{r_l}`` and ``h_i = h_{i+1} * g^{r_i}``;
``u_i`` learns only ``r_i`` (in its onion layer) and derives ``s_i = s_{i+1} + r_i`` from the
downstream preimage. So every hop has its own condition (unlinkable without the tweaks, by DDH),
``u_i`` can always derive its preimage whatever the sender did (``g^{s_{i+1} + r_i} = h_i`` holds by
construction), and colluders around an honest hop cannot skip it: they lack its tweak, which is
what blocks the wormhole attack. The default group (:data:`SIM_GROUP`, 256-bit ``p``) is sized for
fast simulation, not for real security; :data:`RFC3526_2048` is the 2048-bit MODP group.

:class:`SingleHashLock` is the non-private baseline (one ``sha256`` hash lock on every hop).

**Onion** (:func:`build_onion` / :func:`peel_onion`): a constant-size Sphinx-like packet. Hop ``j``
shares a key with the sender through X25519 (a fresh ephemeral key per hop), decrypts the routing
blob with a ChaCha20 key stream, checks an HMAC-SHA256 tag, reads its fixed-size header
(:class:`HopPayload`: next hop, ``a_{j+1}``, ``T_{j+1}``, lock tweak, invoice tag) and shifts the
blob; filler bytes keep every packet :data:`ONION_BYTES` long, so a hop learns neither its position
nor the path beyond its successor.

Examples:
    >>> import random
    >>> scheme = PerHopLocks()
    >>> x, h = scheme.new_secret(random.Random(0))
    >>> conds, tweaks = scheme.setup(h, 3, random.Random(1))
    >>> len(set(conds)), scheme.verify(scheme.receiver_preimage(x, tweaks[-1]), conds[-1])
    (3, True)
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from decjax.payments.checkers import Violation
from decjax.payments.crypto import check_preimage, digest
from decjax.payments.errors import ConfigError, CryptoError

# -- per-hop locks -------------------------------------------------------------------------------
TWEAK_BYTES = 32  # tweaks are short exponents (256 bits), as in common DH practice


@dataclasses.dataclass(frozen=True)
class LockGroup:
    """The order-``q`` subgroup of ``Z_p^*`` for a safe prime ``p = 2q + 1``; ``g`` generates it."""

    p: int
    g: int = 4

    @property
    def q(self) -> int:
        return (self.p - 1) // 2

    @property
    def size(self) -> int:
        return (self.p.bit_length() + 7) // 8

    def element(self, value: int) -> bytes:
        return value.to_bytes(self.size, "big")

    def exp(self, s: int) -> bytes:
        return self.element(pow(self.g, s % self.q, self.p))


SIM_GROUP = LockGroup(0x867673C74B6B88702B089F9AF375181BE13F0D1A79418AA8CDCC3D1AB9AED87F)
RFC3526_2048 = LockGroup(int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E34"
    "04DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6"
    "F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA48361C55D39A6916"
    "3FA8FD24CF5F83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C08CA18217C"
    "32905E462E36CE3BE39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6955817183995497CEA95"
    "6AE515D2261898FA051015728E5A8AACAA68FFFFFFFFFFFFFFFF", 16), g=4)


class PerHopLocks:
    """AMHL-style locks: condition ``g^s``, preimage ``s`` (big-endian bytes), tweak ``r``."""

    private = True

    def __init__(self, group: LockGroup = SIM_GROUP):
        self.group = group

    def _int(self, raw: bytes) -> int:
        return int.from_bytes(raw, "big")

    def _bytes(self, s: int) -> bytes:
        return (s % self.group.q).to_bytes(self.group.size, "big")

    def new_secret(self, rng: Any) -> tuple[bytes, bytes]:
        """Receiver's invoice secret ``x`` and condition ``g^x``."""
        x = rng.randrange(1, self.group.q)
        return self._bytes(x), self.group.exp(x)

    def setup(self, invoice: bytes, hops: int, rng: Any) -> tuple[list[bytes], list[bytes]]:
        """Sender: per-hop conditions ``h_1..h_l`` and tweaks ``r_1..r_l`` from ``g^x``."""
        gp = self.group
        tweaks = [rng.randrange(1, min(gp.q, 2 ** (8 * TWEAK_BYTES))) for _ in range(hops)]
        conds, cur = [b""] * hops, self._int(invoice)
        for i in reversed(range(hops)):
            cur = cur * pow(gp.g, tweaks[i], gp.p) % gp.p
            conds[i] = gp.element(cur)
        return conds, [r.to_bytes(TWEAK_BYTES, "big") for r in tweaks]

    def receiver_preimage(self, x: bytes, tweak: bytes) -> bytes:
        return self.derive(x, tweak)

    def derive(self, downstream: bytes, tweak: bytes) -> bytes:
        """Upstream preimage ``s_i = s_{i+1} + r_i``."""
        return self._bytes(self._int(downstream) + self._int(tweak))

    def downstream_cond(self, cond: bytes, tweak: bytes) -> bytes:
        """``h_{i+1} = h_i * g^{-r_i}``: the condition ``u_i`` puts on its outgoing lock."""
        gp = self.group
        inv = pow(gp.g, gp.q - self._int(tweak) % gp.q, gp.p)
        return gp.element(self._int(cond) * inv % gp.p)

    def verify(self, preimage: bytes, cond: bytes) -> bool:
        ok = isinstance(preimage, bytes) and len(preimage) == self.group.size
        return ok and hmac.compare_digest(self.group.exp(self._int(preimage)), cond)

    def ledger_hashlock(self, cond: bytes) -> bytes | None:
        """The ledger cannot check discrete-log locks: committees and parties check them."""
        return None


class SingleHashLock:
    """Non-private baseline: the same ``sha256`` lock on every hop (Lightning-style HTLC)."""

    private = False

    def new_secret(self, rng: Any) -> tuple[bytes, bytes]:
        x = rng.getrandbits(256).to_bytes(32, "big")
        return x, hashlib.sha256(x).digest()

    def setup(self, invoice: bytes, hops: int, rng: Any) -> tuple[list[bytes], list[bytes]]:
        return [invoice] * hops, [b""] * hops

    def receiver_preimage(self, x: bytes, tweak: bytes) -> bytes:
        return x

    def derive(self, downstream: bytes, tweak: bytes) -> bytes:
        return downstream

    def downstream_cond(self, cond: bytes, tweak: bytes) -> bytes:
        return cond

    def verify(self, preimage: bytes, cond: bytes) -> bool:
        return check_preimage(preimage, cond)

    def ledger_hashlock(self, cond: bytes) -> bytes | None:
        return cond


def lock_id_for(cond: bytes) -> str:
    """Lock id derived from the hop's condition (so it does not link hops either)."""
    return "L" + digest("syncpcn-lock-id", cond).hex()[:20]


# -- onion ---------------------------------------------------------------------------------------
MAX_HOPS = 8
ID_BYTES = 32
TAG_BYTES = 16
MAC_BYTES = 16
_HEAD = struct.Struct(f">{ID_BYTES}s32s{MAC_BYTES}sqd{TWEAK_BYTES}s{TAG_BYTES}s")
HEADER_BYTES = _HEAD.size
BLOB_BYTES = MAX_HOPS * HEADER_BYTES
ONION_BYTES = 32 + BLOB_BYTES + MAC_BYTES


@dataclasses.dataclass(frozen=True)
class HopPayload:
    """What a hop learns: successor (None at the receiver), ``a_{j+1}``, ``T_{j+1}``, tweak, tag."""

    next_hop: str | None
    amount: int
    deadline: float
    tweak: bytes
    tag: bytes = b""


class OnionKeys:
    """X25519 routing keys of every party, derived from ``(seed, party)`` (a PKI for onions)."""

    def __init__(self, seed: int, parties: Iterable[str]):
        self._priv = {p: X25519PrivateKey.from_private_bytes(
            digest("syncpcn-onion-key", seed, p)) for p in parties}
        self.public = {p: k.public_key() for p, k in self._priv.items()}

    def private(self, party: str) -> X25519PrivateKey:
        return self._priv[party]


def _pub_bytes(key: X25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _keys(shared: bytes, eph: bytes) -> tuple[bytes, bytes]:
    base = hashlib.sha256(b"syncpcn-onion" + shared + eph).digest()
    return hashlib.sha256(b"rho" + base).digest(), hashlib.sha256(b"mu" + base).digest()


def _stream(rho: bytes, n: int) -> bytes:
    enc = Cipher(algorithms.ChaCha20(rho, b"\x00" * 16), mode=None).encryptor()
    return enc.update(b"\x00" * n)


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _mac(mu: bytes, blob: bytes) -> bytes:
    return hmac.new(mu, blob, hashlib.sha256).digest()[:MAC_BYTES]


def _pack(next_hop: str | None, eph: bytes, mac: bytes, p: HopPayload) -> bytes:
    raw = (next_hop or "").encode()
    if len(raw) > ID_BYTES or len(p.tweak) > TWEAK_BYTES or len(p.tag) > TAG_BYTES:
        raise ConfigError(f"onion field too long (party id {next_hop!r} or tweak/tag)")
    return _HEAD.pack(raw, eph, mac, p.amount, float(p.deadline),
                      p.tweak.rjust(TWEAK_BYTES, b"\0"), p.tag.ljust(TAG_BYTES, b"\0"))


def build_onion(route: Sequence[str], payloads: Sequence[HopPayload], keys: OnionKeys,
                rng: Any) -> bytes:
    """Onion for ``route = (u_1..u_l)``; ``payloads[j]`` is what ``u_{j+1}`` reads."""
    hops = len(route)
    if not 1 <= hops <= MAX_HOPS or len(payloads) != hops:
        raise ConfigError(f"onion needs 1..{MAX_HOPS} hops and one payload each, got {hops}")
    ephs = [X25519PrivateKey.from_private_bytes(rng.getrandbits(256).to_bytes(32, "big"))
            for _ in route]
    eph_pub = [_pub_bytes(e.public_key()) for e in ephs]
    secrets = [_keys(e.exchange(keys.public[u]), ep) for e, u, ep in zip(ephs, route, eph_pub,
                                                                         strict=True)]
    streams = [_stream(rho, BLOB_BYTES + HEADER_BYTES) for rho, _ in secrets]
    filler = b""
    for j in range(hops - 1):
        lo = BLOB_BYTES - len(filler)
        filler = _xor(filler + b"\0" * HEADER_BYTES, streams[j][lo:BLOB_BYTES + HEADER_BYTES])
    pad_len = BLOB_BYTES - HEADER_BYTES * hops
    last = _pack(None, b"\0" * 32, b"\0" * MAC_BYTES, payloads[-1])
    pad = rng.getrandbits(8 * pad_len).to_bytes(pad_len, "big") if pad_len else b""
    blob = _xor(last + pad, streams[-1][:BLOB_BYTES - len(filler)]) + filler
    mac = _mac(secrets[-1][1], blob)
    for j in reversed(range(hops - 1)):
        head = _pack(route[j + 1], eph_pub[j + 1], mac, payloads[j])
        blob = _xor(head + blob[:BLOB_BYTES - HEADER_BYTES], streams[j][:BLOB_BYTES])
        mac = _mac(secrets[j][1], blob)
    return eph_pub[0] + blob + mac


def peel_onion(packet: bytes, key: X25519PrivateKey) -> tuple[HopPayload, bytes | None]:
    """Decrypt one layer; returns the payload and the packet for the successor (None at the end).

    Raises :class:`CryptoError` on a wrong size or a bad tag (tampered or not for this party).
    """
    if not isinstance(packet, bytes) or len(packet) != ONION_BYTES:
        raise CryptoError(f"onion must be {ONION_BYTES} bytes")
    eph, blob, mac = packet[:32], packet[32:-MAC_BYTES], packet[-MAC_BYTES:]
    try:
        shared = key.exchange(X25519PublicKey.from_public_bytes(eph))
    except ValueError as err:
        raise CryptoError(f"onion: bad ephemeral key ({err})") from None
    rho, mu = _keys(shared, eph)
    if not hmac.compare_digest(_mac(mu, blob), mac):
        raise CryptoError("onion: MAC check failed")
    plain = _xor(blob + b"\0" * HEADER_BYTES, _stream(rho, BLOB_BYTES + HEADER_BYTES))
    raw, eph_next, mac_next, amount, deadline, tweak, tag = _HEAD.unpack(plain[:HEADER_BYTES])
    nxt = raw.rstrip(b"\0").decode() or None
    payload = HopPayload(nxt, amount, deadline, tweak, tag)
    if nxt is None:
        return payload, None
    return payload, eph_next + plain[HEADER_BYTES:] + mac_next


# -- privacy-view check --------------------------------------------------------------------------
def leaves(obj: Any, name: str = "") -> Iterable[tuple[str, Any]]:
    """``(field name, value)`` for every plain value inside a message."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from leaves(getattr(obj, f.name), f.name)
    elif isinstance(obj, tuple | list):
        for x in obj:
            yield from leaves(x, name)
    else:
        yield name, obj


IDENTITY_FIELDS = frozenset({"amount", "value", "payer", "payee", "sender", "receiver", "party"})


def check_view_privacy(member_views: Mapping[str, Sequence[Any]],
                       party_views: Mapping[str, Sequence[Any]], parties: Iterable[str],
                       allowed: Mapping[str, Iterable[str]],
                       hop_conds: Mapping[str, Sequence[bytes]]) -> list[Violation]:
    """Spec §6.2 item 9 on recorded views.

    * ``member_views``: committee member -> messages it received (optimistic runs): none may carry
      an amount/identity field or a party id;
    * ``party_views``: intermediary -> messages and peeled payloads it saw: the party ids in them
      must lie in ``allowed[intermediary]`` (itself and its two neighbours);
    * ``hop_conds``: payment -> per-hop lock conditions: pairwise distinct within and across.
    """
    ids = frozenset(parties)
    out = []
    for member, msgs in member_views.items():
        for msg in msgs:
            for field, value in leaves(msg):
                if field in IDENTITY_FIELDS or (isinstance(value, str) and value in ids):
                    out.append(Violation("privacy", f"member {member} saw {field}={value!r} in "
                                         f"{type(msg).__name__}"))
    for party, msgs in party_views.items():
        ok = frozenset(allowed.get(party, ()))
        seen = sorted({v for m in msgs for _, v in leaves(m) if isinstance(v, str) and v in ids})
        extra = [p for p in seen if p not in ok]
        if extra:
            out.append(Violation("privacy", f"intermediary {party} learned non-neighbours {extra}"))
    owner: dict[bytes, str] = {}
    for pid, conds in hop_conds.items():
        for i, cond in enumerate(conds, 1):
            prior = owner.setdefault(cond, f"{pid} hop {i}")
            if prior != f"{pid} hop {i}":
                out.append(Violation("privacy", f"lock condition of {pid} hop {i} equals {prior}"))
    return out
