"""Region-to-region network model of the simulated decentralized world.

A :class:`Network` holds latency and bandwidth between named regions; a :class:`Placement` puts
nodes into regions. Moving ``nbytes`` from region ``a`` to region ``b`` costs

    latency[a, b] + nbytes / bandwidth[a, b] + hop_overhead_s

seconds (the skippipe/CheckFree communication model plus a fixed per-hop software overhead).
The diagonal holds the link between two distinct nodes of the same region.
"""

import csv
import dataclasses
import io
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Self

import numpy as np

from decjax.sim._checks import count, index, nonneg, positive

GIB = 2**30
_MS = 1e-3
_GCP12_FILE = "regions_gcp12.csv"
_GCP12_VARIANTS = {"checkfree": "bandwidth_gibps", "skippipe": "bandwidth_gibps_skippipe"}
_REQUIRED_COLUMNS = ("region_a", "region_b", "latency_ms")
# skippipe's fallback for pairs missing from its table, i.e. two nodes in one region.
SAME_REGION_DEFAULT = (1.0, 2.0)

Region = str | int


def _readonly(array: np.ndarray) -> np.ndarray:
    # Frozen dataclasses cannot stop in-place writes to an array field; a read-only copy can.
    out = np.array(array, copy=True)
    out.flags.writeable = False
    return out


def _float_matrix(value, name: str, n: int) -> np.ndarray:
    """``value`` as a finite float64 ``[n, n]`` matrix."""
    try:
        m = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a numeric [R, R] matrix, got {value!r}") from None
    if m.shape != (n, n):
        raise ValueError(f"{name} must be square [R, R] = [{n}, {n}] to match regions, "
                         f"got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{name} must be finite everywhere")
    return m


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: array fields have no scalar ==
class Network:
    """Latency and bandwidth between named regions.

    Attributes:
        regions: unique region names, in matrix order.
        latency_s: ``[R, R]`` one-way latency in seconds; ``[i, i]`` is the same-region link.
        bandwidth_bytes_per_s: ``[R, R]`` link bandwidth in bytes per second, all > 0.
        hop_overhead_s: fixed extra seconds per transfer (serialization, RPC, scheduling).
        name: label used in summaries.
    """

    regions: tuple[str, ...]
    latency_s: np.ndarray
    bandwidth_bytes_per_s: np.ndarray
    hop_overhead_s: float = 0.0
    name: str = "network"

    def __post_init__(self):
        if isinstance(self.regions, str) or not isinstance(self.regions, Sequence):
            raise ValueError(f"regions must be a sequence of names, got {self.regions!r}")
        regions = tuple(self.regions)
        if not regions:
            raise ValueError("regions must name at least one region")
        for r in regions:
            if not isinstance(r, str) or not r:
                raise ValueError(f"regions must be non-empty strings, got {r!r}")
        dupes = sorted({r for r in regions if regions.count(r) > 1})
        if dupes:
            raise ValueError(f"regions must be unique, duplicated: {dupes}")
        n = len(regions)
        latency = _float_matrix(self.latency_s, "latency_s", n)
        bandwidth = _float_matrix(self.bandwidth_bytes_per_s, "bandwidth_bytes_per_s", n)
        bad = np.argwhere(latency < 0)
        if bad.size:
            i, j = bad[0]
            raise ValueError(f"latency_s must be >= 0, got {latency[i, j]} for "
                             f"{regions[i]}-{regions[j]}")
        bad = np.argwhere(bandwidth <= 0)
        if bad.size:
            i, j = bad[0]
            raise ValueError(f"bandwidth_bytes_per_s must be > 0, got {bandwidth[i, j]} for "
                             f"{regions[i]}-{regions[j]}")
        if not isinstance(self.name, str):
            raise ValueError(f"name must be a string, got {self.name!r}")
        object.__setattr__(self, "regions", regions)
        object.__setattr__(self, "latency_s", _readonly(latency))
        object.__setattr__(self, "bandwidth_bytes_per_s", _readonly(bandwidth))
        object.__setattr__(self, "hop_overhead_s",
                           nonneg(self.hop_overhead_s, "hop_overhead_s"))

    @property
    def n_regions(self) -> int:
        """Number of regions ``R``."""
        return len(self.regions)

    def region_index(self, region: Region) -> int:
        """Index of ``region``, given by name or by index.

        Raises:
            ValueError: unknown name (the message lists the known ones) or index out of range.
        """
        if isinstance(region, str):
            try:
                return self.regions.index(region)
            except ValueError:
                raise ValueError(f"unknown region {region!r}; known regions: "
                                 f"{', '.join(self.regions)}") from None
        return index(region, "region index", self.n_regions)

    def transfer_seconds(self, a: Region, b: Region, nbytes: float) -> float:
        """Seconds to move ``nbytes`` from region ``a`` to region ``b`` (names or indices)."""
        i, j = self.region_index(a), self.region_index(b)
        nbytes = nonneg(nbytes, "nbytes")
        return float(self.latency_s[i, j] + nbytes / self.bandwidth_bytes_per_s[i, j]
                     + self.hop_overhead_s)

    def transfer_matrix(self, nbytes: float) -> np.ndarray:
        """``[R, R]`` transfer seconds for ``nbytes`` between every pair of regions."""
        nbytes = nonneg(nbytes, "nbytes")
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s + self.hop_overhead_s

    def with_overhead(self, hop_overhead_s: float) -> Self:
        """Copy of this network with a different per-hop overhead."""
        return dataclasses.replace(self, hop_overhead_s=hop_overhead_s)

    def summary(self) -> str:
        """One line: name, regions, median cross-region latency and bandwidth, overhead."""
        if self.n_regions > 1:
            # Cross-region links only: the diagonal would drag the medians toward one datacenter.
            mask = ~np.eye(self.n_regions, dtype=bool)
        else:
            mask = np.ones((1, 1), dtype=bool)
        latency_ms = float(np.median(self.latency_s[mask])) / _MS
        mbit_s = float(np.median(self.bandwidth_bytes_per_s[mask])) * 8 / 1e6
        return (f"{self.name}: {self.n_regions} regions ({', '.join(self.regions)}); "
                f"median latency {latency_ms:.1f} ms, median bandwidth {mbit_s:.1f} Mbit/s, "
                f"hop overhead {self.hop_overhead_s:.3f} s")

    @classmethod
    def gcp12(cls, *, variant: str = "checkfree", hop_overhead_s: float = 0.0) -> Self:
        """The 12 GCP regions measured by skippipe and CheckFree (package data).

        The two reference tables agree everywhere except the NL-London bandwidth: skippipe
        (``schedulers/communication_costs.py``) has 0.000236816 GiB/s, which makes a single
        activation hop take minutes and is almost certainly a typo; CheckFree
        (``communication/communication_costs.py``) has 0.0236816 GiB/s.

        Args:
            variant: ``"checkfree"`` (corrected NL-London value, the default) or ``"skippipe"``
                (its typo, for parity runs against skippipe's numbers).
            hop_overhead_s: fixed extra seconds per transfer.
        """
        if variant not in _GCP12_VARIANTS:
            raise ValueError(f"variant must be one of {sorted(_GCP12_VARIANTS)}, got {variant!r}")
        # One joinpath step at a time: namespace-package paths take a single child on 3.11.
        data = resources.files("decjax.sim").joinpath("data").joinpath(_GCP12_FILE)
        text = data.read_text("utf-8")
        return cls._from_text(text, source=_GCP12_FILE, bandwidth_column=_GCP12_VARIANTS[variant],
                              hop_overhead_s=hop_overhead_s, same_region=SAME_REGION_DEFAULT,
                              name=f"gcp12-{variant}")

    @classmethod
    def uniform(cls, regions: int | Sequence[str], *, latency_ms: float, bandwidth_gibps: float,
                hop_overhead_s: float = 0.0) -> Self:
        """Every link, same-region ones included, with the same latency and bandwidth.

        Args:
            regions: a region count (names become ``r0, r1, ...``) or the region names.
            latency_ms: latency of every link in milliseconds.
            bandwidth_gibps: bandwidth of every link in GiB/s.
            hop_overhead_s: fixed extra seconds per transfer.
        """
        if isinstance(regions, str):
            raise ValueError(f"regions must be a count or a sequence of names, got {regions!r}")
        if isinstance(regions, Sequence):
            names = tuple(regions)
        else:
            names = tuple(f"r{i}" for i in range(count(regions, "regions")))
        latency = nonneg(latency_ms, "latency_ms") * _MS
        bandwidth = positive(bandwidth_gibps, "bandwidth_gibps") * GIB
        n = len(names)
        return cls(regions=names, latency_s=np.full((n, n), latency),
                   bandwidth_bytes_per_s=np.full((n, n), bandwidth),
                   hop_overhead_s=hop_overhead_s,
                   name=f"uniform-{latency_ms:g}ms-{bandwidth_gibps:g}GiBps")

    @classmethod
    def from_csv(cls, path: str | Path, *, hop_overhead_s: float = 0.0,
                 same_region: tuple[float, float] = SAME_REGION_DEFAULT,
                 bandwidth_column: str = "bandwidth_gibps", name: str | None = None) -> Self:
        """Reads a symmetric pair table.

        Format: ``#`` comment lines, then a CSV header with ``region_a, region_b, latency_ms``
        and ``bandwidth_column`` (GiB/s, i.e. bytes / (bw * 2**30)); one row per unordered pair.
        Regions are ordered by first appearance. A row with ``region_a == region_b`` sets that
        region's same-region link; otherwise the diagonal is ``same_region``.

        Args:
            path: the CSV file.
            hop_overhead_s: fixed extra seconds per transfer.
            same_region: ``(latency_ms, bandwidth_gibps)`` of links within one region.
            bandwidth_column: which bandwidth column to read.
            name: label; defaults to the file stem.

        Raises:
            ValueError: missing column or pair, conflicting duplicate row, bad numbers.
        """
        path = Path(path)
        try:
            text = path.read_text("utf-8")
        except OSError as e:
            raise ValueError(f"path {str(path)!r} cannot be read: {e}") from None
        return cls._from_text(text, source=str(path), bandwidth_column=bandwidth_column,
                              hop_overhead_s=hop_overhead_s, same_region=same_region,
                              name=path.stem if name is None else name)

    @classmethod
    def _from_text(cls, text: str, *, source: str, bandwidth_column: str, hop_overhead_s: float,
                   same_region: tuple[float, float], name: str) -> Self:
        """Parses the pair-table format of :meth:`from_csv`; ``source`` labels errors."""
        try:
            same_latency_ms, same_gibps = same_region
        except (TypeError, ValueError):
            raise ValueError("same_region must be (latency_ms, bandwidth_gibps), "
                             f"got {same_region!r}") from None
        same = (nonneg(same_latency_ms, "same_region latency_ms"),
                positive(same_gibps, "same_region bandwidth_gibps"))
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        rows = list(csv.DictReader(io.StringIO("\n".join(lines)), skipinitialspace=True))
        header = rows[0].keys() if rows else ()
        for column in (*_REQUIRED_COLUMNS, bandwidth_column):
            if column not in header:
                raise ValueError(f"{source}: missing column {column!r} (need "
                                 f"{', '.join((*_REQUIRED_COLUMNS, bandwidth_column))})")
        pairs: dict[frozenset, tuple[float, float]] = {}
        regions: list[str] = []
        for k, row in enumerate(rows, start=1):
            a, b = (row["region_a"] or "").strip(), (row["region_b"] or "").strip()
            where = f"{source}: data row {k} ({a}-{b})"
            if not a or not b:
                raise ValueError(f"{where}: region_a and region_b must be non-empty")
            link = (nonneg(row["latency_ms"], f"{where} latency_ms"),
                    positive(row[bandwidth_column], f"{where} {bandwidth_column}"))
            key = frozenset((a, b))
            if key in pairs and pairs[key] != link:
                raise ValueError(f"{where}: pair listed twice with different values")
            pairs[key] = link
            regions += [r for r in (a, b) if r not in regions]
        if not regions:
            raise ValueError(f"{source}: no region pairs found")
        n = len(regions)
        latency = np.empty((n, n))
        bandwidth = np.empty((n, n))
        for i, a in enumerate(regions):
            for j, b in enumerate(regions):
                link = pairs.get(frozenset((a, b)))
                if link is None and i != j:
                    raise ValueError(f"{source}: missing pair {a}-{b}")
                lat_ms, gibps = same if link is None else link
                latency[i, j] = lat_ms * _MS
                bandwidth[i, j] = gibps * GIB
        return cls(regions=tuple(regions), latency_s=latency, bandwidth_bytes_per_s=bandwidth,
                   hop_overhead_s=hop_overhead_s, name=name)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: array field has no scalar ==
class Placement:
    """Which region each node lives in.

    Attributes:
        network: the network the nodes communicate over.
        node_regions: ``int [N]`` region index of each node.
    """

    network: Network
    node_regions: np.ndarray

    def __post_init__(self):
        if not isinstance(self.network, Network):
            raise ValueError(f"network must be a Network, got {type(self.network).__name__}")
        regions = np.asarray(self.node_regions)
        if regions.ndim != 1 or regions.size == 0:
            raise ValueError(f"node_regions must be a non-empty 1-D array, got shape "
                             f"{regions.shape}")
        if not np.issubdtype(regions.dtype, np.integer):
            raise ValueError(f"node_regions must hold integer region indices, got dtype "
                             f"{regions.dtype}")
        r = self.network.n_regions
        bad = np.flatnonzero((regions < 0) | (regions >= r))
        if bad.size:
            raise ValueError(f"node_regions must be in [0, {r}), node {bad[0]} has "
                             f"{regions[bad[0]]}")
        object.__setattr__(self, "node_regions", _readonly(regions.astype(np.int64)))

    @property
    def n_nodes(self) -> int:
        """Number of nodes ``N``."""
        return int(self.node_regions.shape[0])

    def _node(self, node, name: str = "node") -> int:
        return index(node, name, self.n_nodes)

    def region_of(self, node: int) -> str:
        """Region name of ``node``."""
        return self.network.regions[self.node_regions[self._node(node)]]

    def transfer_seconds(self, i: int, j: int, nbytes: float) -> float:
        """Seconds to move ``nbytes`` from node ``i`` to node ``j``; 0.0 when ``i == j``.

        Two distinct nodes in one region use that region's diagonal (same-region) link.
        """
        i, j = self._node(i, "i"), self._node(j, "j")
        nbytes = nonneg(nbytes, "nbytes")
        if i == j:
            return 0.0
        return self.network.transfer_seconds(int(self.node_regions[i]),
                                              int(self.node_regions[j]), nbytes)

    def transfer_matrix(self, nbytes: float) -> np.ndarray:
        """``[N, N]`` transfer seconds for ``nbytes`` between every pair of nodes (0 diagonal)."""
        per_region = self.network.transfer_matrix(nbytes)
        out = per_region[np.ix_(self.node_regions, self.node_regions)]
        np.fill_diagonal(out, 0.0)
        return out

    def describe(self) -> str:
        """Table of nodes and their regions."""
        width = max(len("region"), *(len(r) for r in self.network.regions))
        lines = [f"{self.network.name}: {self.n_nodes} nodes",
                 f"{'node':>5}  {'region':<{width}}  index"]
        for k, r in enumerate(self.node_regions):
            lines.append(f"{k:>5}  {self.network.regions[r]:<{width}}  {r:>5}")
        return "\n".join(lines)


def place_round_robin(network: Network, n_nodes: int) -> Placement:
    """Node ``k`` goes to region ``k % R`` (skippipe's ``id_to_loc``)."""
    n = count(n_nodes, "n_nodes")
    return Placement(network, np.arange(n) % network.n_regions)


def place_explicit(network: Network, region_names: Sequence[Region]) -> Placement:
    """Node ``k`` goes to ``region_names[k]`` (names or region indices)."""
    if isinstance(region_names, str) or not isinstance(region_names, Sequence):
        raise ValueError(f"region_names must be a sequence of regions, got {region_names!r}")
    if not region_names:
        raise ValueError("region_names must place at least one node")
    return Placement(network, np.array([network.region_index(r) for r in region_names]))


def place_random(network: Network, n_nodes: int, seed: int) -> Placement:
    """Each node in a uniformly random region, drawn with ``numpy.random.default_rng(seed)``."""
    n = count(n_nodes, "n_nodes")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(seed)
    return Placement(network, rng.integers(0, network.n_regions, size=n))
