"""The channel graph: parties, channels, deterministic routing, random topologies.

Plain dicts, no networkx: adjacency lists keep insertion order and BFS visits neighbours sorted
by ``(party, cid)``, so routes never depend on hashing.

Examples:
    >>> g = ChannelGraph()
    >>> _ = g.add_channel("s", "i", 10, 10); _ = g.add_channel("i", "r", 10, 10)
    >>> g.path("s", "r", amount=5)
    ('s', 'i', 'r')
    >>> [ch.cid for ch in g.route_channels(("s", "i", "r"))]
    ['c0', 'c1']
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence

from decjax.payments.channels import Channel, check_amount
from decjax.payments.errors import (
    ChannelClosed,
    ConfigError,
    NoRoute,
    PaymentError,
    UnknownChannel,
    UnknownParty,
)


class ChannelGraph:
    """Parties and the channels between them (parallel channels allowed)."""

    def __init__(self) -> None:
        self.channels: dict[str, Channel] = {}
        self.adjacency: dict[str, list[tuple[str, str]]] = {}

    @property
    def parties(self) -> tuple[str, ...]:
        return tuple(self.adjacency)

    def add_party(self, party: str) -> None:
        if not isinstance(party, str) or not party:
            raise UnknownParty(f"party id must be a non-empty str, got {party!r}")
        self.adjacency.setdefault(party, [])

    def add_channel(self, a: str, b: str, bal_a: int, bal_b: int,
                    cid: str | None = None) -> Channel:
        """Open a channel ``a``-``b`` with the given balances (cid defaults to ``c<k>``)."""
        cid = f"c{len(self.channels)}" if cid is None else cid
        if cid in self.channels:
            raise PaymentError(f"channel id {cid!r} already exists")
        ch = Channel.open(cid, a, b, bal_a, bal_b)
        self.add_party(a)
        self.add_party(b)
        self.channels[cid] = ch
        self.adjacency[a].append((b, cid))
        self.adjacency[b].append((a, cid))
        return ch

    def channel(self, cid: str) -> Channel:
        try:
            return self.channels[cid]
        except KeyError:
            raise UnknownChannel(f"unknown channel {cid!r}") from None

    def _check_party(self, party: str) -> None:
        if party not in self.adjacency:
            raise UnknownParty(f"unknown party {party!r}")

    def between(self, a: str, b: str) -> Channel:
        """The first open channel between ``a`` and ``b`` (else the first closed one)."""
        self._check_party(a)
        self._check_party(b)
        found = [self.channels[cid] for nb, cid in self.adjacency[a] if nb == b]
        if not found:
            raise UnknownChannel(f"no channel between {a!r} and {b!r}")
        return next((ch for ch in found if ch.is_open), found[0])

    def route_channels(self, parties: Sequence[str]) -> list[Channel]:
        """Channels along an explicit party path; every one must exist and be open."""
        if len(parties) < 2:
            raise NoRoute(f"a route needs at least two parties, got {list(parties)}")
        chans = [self.between(u, v) for u, v in zip(parties, parties[1:], strict=False)]
        for ch in chans:
            if not ch.is_open:
                raise ChannelClosed(f"route {list(parties)} passes closed channel {ch.cid!r} "
                                    f"({ch.a!r}-{ch.b!r})")
        return chans

    def path(self, src: str, dst: str, amount: int) -> tuple[str, ...]:
        """Shortest party path ``src..dst`` over open channels whose payer side has
        ``>= amount`` free balance; BFS with neighbours sorted, so the result is deterministic."""
        self._check_party(src)
        self._check_party(dst)
        check_amount(amount)
        if src == dst:
            raise NoRoute(f"source and destination are the same party {src!r}")
        parent: dict[str, str] = {src: src}
        queue = deque([src])
        while queue:
            u = queue.popleft()
            for v, cid in sorted(self.adjacency[u]):
                ch = self.channels[cid]
                if v in parent or not ch.is_open or ch.balances[u] < amount:
                    continue
                parent[v] = u
                if v == dst:
                    out = [v]
                    while out[-1] != src:
                        out.append(parent[out[-1]])
                    return tuple(reversed(out))
                queue.append(v)
        raise NoRoute(f"no route from {src!r} to {dst!r} with free balance >= {amount}")

    def total_funds(self) -> int:
        return sum(ch.capacity for ch in self.channels.values())

    def holdings(self, include_locked: bool = True) -> dict[str, int]:
        """Per party: free balances summed over channels, plus pending locks it pays from."""
        out = {p: 0 for p in self.adjacency}
        for ch in self.channels.values():
            for p in ch.parties:
                out[p] += ch.balances[p]
            if include_locked:
                for lk in ch.locks.values():
                    out[lk.payer] += lk.amount
        return out

    def snapshot(self) -> dict[str, tuple]:
        return {cid: ch.snapshot() for cid, ch in self.channels.items()}

    @classmethod
    def random_graph(cls, n_parties: int, n_channels: int, seed: int,
                     capacity: tuple[int, int] = (100, 1000)) -> ChannelGraph:
        """A connected random graph: a random spanning tree plus extra distinct edges.

        Parties are ``p0..p{n-1}``; each channel's capacity is uniform in ``capacity`` and split
        uniformly at random between the endpoints.
        """
        if not (isinstance(n_parties, int) and n_parties >= 2):
            raise ConfigError(f"n_parties must be an int >= 2, got {n_parties!r}")
        max_edges = n_parties * (n_parties - 1) // 2
        if not (n_parties - 1 <= n_channels <= max_edges):
            raise ConfigError(f"n_channels must be in [{n_parties - 1}, {max_edges}] for "
                              f"{n_parties} connected parties, got {n_channels}")
        lo, hi = capacity
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise ConfigError(f"capacity range must be ints 1 <= lo <= hi, got {capacity!r}")
        rng = random.Random(seed)
        names = [f"p{i}" for i in range(n_parties)]
        edges = [(rng.randrange(i), i) for i in range(1, n_parties)]
        used = set(edges)
        while len(edges) < n_channels:
            i, j = sorted(rng.sample(range(n_parties), 2))
            if (i, j) not in used:
                used.add((i, j))
                edges.append((i, j))
        g = cls()
        for name in names:
            g.add_party(name)
        for i, j in edges:
            cap = rng.randint(lo, hi)
            bal_i = rng.randint(0, cap)
            g.add_channel(names[i], names[j], bal_i, cap - bal_i)
        return g
