"""Seeded discrete-event loop shared by both payment protocols.

Events sit in one heap keyed by ``(time, seq_no)``: ties break by scheduling order, never by
object identity, so a run is a pure function of the seed. Every component draws randomness from
``sim.rng_for(name)``, a ``random.Random`` derived from ``(seed, name)`` with SHA-256 (not
``hash()``, which ``PYTHONHASHSEED`` salts). ``sim.trace`` holds :class:`TraceEvent` tuples of
plain values, so "same seed, same trace" is a plain ``==``.

Nodes are registered by id; ``node.send(dst, message)`` goes through the simulator's network
(see :mod:`decjax.payments.network`), which schedules ``dst.receive(src, message)``.

Examples:
    >>> sim = Simulator(seed=0)
    >>> sim.schedule(2.0, lambda: sim.record("tick", n=1))
    0
    >>> sim.run()
    1
    >>> sim.now, sim.trace[-1].kind, dict(sim.trace[-1].data)
    (2.0, 'tick', {'n': 1})
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from decjax.payments.errors import SimulationError, UnknownParty

if TYPE_CHECKING:
    from decjax.payments.network import Network

Observer = Callable[["Simulator"], None]


class TraceEvent(NamedTuple):
    """One recorded event: simulated time, global order, kind and sorted ``(key, value)`` data."""

    time: float
    seq: int
    kind: str
    data: tuple[tuple[str, Any], ...]


class Node:
    """A simulated participant (party or committee member) addressed by ``id``.

    Subclasses override :meth:`on_message`. :meth:`receive` is the network's entry point; adversary
    wrappers (see :class:`decjax.payments.committee.Member`) intercept there.
    """

    def __init__(self, node_id: str):
        self.id = node_id
        self.sim: Simulator | None = None

    @property
    def now(self) -> float:
        return self._sim().now

    def _sim(self) -> Simulator:
        if self.sim is None:
            raise SimulationError(f"node {self.id!r} is not added to a Simulator")
        return self.sim

    def send(self, dst: str, message: Any) -> None:
        """Send ``message`` to node ``dst`` through the simulator's network."""
        self._sim().send(self.id, dst, message)

    def receive(self, src: str, message: Any) -> None:
        """Network delivery entry point; calls :meth:`on_message`."""
        self.on_message(src, message)

    def on_message(self, src: str, message: Any) -> None:
        """Protocol logic; the default ignores the message."""


class Simulator:
    """Deterministic discrete-event simulator.

    Args:
      seed: root seed of every random choice in the run.
      network: optional network; also settable later with :meth:`set_network`.
      trace: record events into :attr:`trace` (turn off for very large runs).
    """

    def __init__(self, seed: int, network: Network | None = None, *, trace: bool = True):
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise SimulationError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.now: float = 0.0
        self.trace: list[TraceEvent] = []
        self.nodes: dict[str, Node] = {}
        self.network: Network | None = None
        self.events_run = 0
        self._tracing = trace
        self._heap: list[tuple[float, int, Callable[[], None], str]] = []
        self._cancelled: set[int] = set()
        self._counter = 0
        self._observers: list[Observer] = []
        if network is not None:
            self.set_network(network)

    # -- randomness, nodes, network -----------------------------------------------------------
    def rng_for(self, name: str) -> random.Random:
        """A fresh ``random.Random`` determined by ``(seed, name)`` only."""
        digest = hashlib.sha256(f"decjax.payments:{self.seed}:{name}".encode()).digest()
        return random.Random(int.from_bytes(digest[:16], "big"))

    def set_network(self, network: Network) -> None:
        self.network = network
        network.attach(self)

    def add_node(self, node: Node) -> Node:
        """Register ``node`` under ``node.id``; ids must be unique."""
        if node.id in self.nodes:
            raise SimulationError(f"node id {node.id!r} is already registered")
        self.nodes[node.id] = node
        node.sim = self
        return node

    def node(self, node_id: str) -> Node:
        try:
            return self.nodes[node_id]
        except KeyError:
            raise UnknownParty(f"unknown node {node_id!r}") from None

    def send(self, src: str, dst: str, message: Any) -> None:
        """Hand ``message`` from ``src`` to the network for delivery to ``dst``."""
        if self.network is None:
            raise SimulationError("Simulator has no network; call set_network() first")
        self.node(src)
        self.node(dst)
        self.network.send(src, dst, message)

    # -- scheduling ----------------------------------------------------------------------------
    def schedule(self, delay: float, callback: Callable[[], None], *, label: str = "") -> int:
        """Run ``callback()`` at ``now + delay``; returns a handle for :meth:`cancel`.

        A non-empty ``label`` is recorded in the trace when the event fires.
        """
        if not delay >= 0:  # also rejects NaN
            raise SimulationError(f"delay must be >= 0, got {delay!r}")
        return self.schedule_at(self.now + delay, callback, label=label)

    def schedule_at(self, time: float, callback: Callable[[], None], *, label: str = "") -> int:
        if not time >= self.now:
            raise SimulationError(f"cannot schedule in the past: time={time!r} < now={self.now}")
        handle = self._counter
        self._counter += 1
        heapq.heappush(self._heap, (float(time), handle, callback, label))
        return handle

    def cancel(self, handle: int) -> None:
        self._cancelled.add(handle)

    def add_observer(self, observer: Observer) -> None:
        """Call ``observer(sim)`` after every event (e.g. an invariant check that raises)."""
        self._observers.append(observer)

    def record(self, kind: str, /, **data: Any) -> None:
        """Append a :class:`TraceEvent`; ``data`` values should be plain (str/int/float/bytes)."""
        if self._tracing:
            entry = TraceEvent(self.now, len(self.trace), kind, tuple(sorted(data.items())))
            self.trace.append(entry)

    # -- running -------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Number of scheduled, not yet run, events (cancelled ones included)."""
        return len(self._heap)

    @property
    def quiescent(self) -> bool:
        return all(h in self._cancelled for _, h, _, _ in self._heap)

    def step(self) -> bool:
        """Run the next event; returns False when nothing is left."""
        while self._heap:
            time, handle, callback, label = heapq.heappop(self._heap)
            if handle in self._cancelled:
                self._cancelled.discard(handle)
                continue
            self.now = time
            self.events_run += 1
            if label:
                self.record("event", label=label)
            callback()
            for observer in self._observers:
                observer(self)
            return True
        return False

    def run(self, until: float | None = None, max_events: int = 1_000_000) -> int:
        """Run events with time <= ``until`` (all if None); returns how many ran.

        Raises ``SimulationError`` after ``max_events`` events if work is still left (a
        livelock guard: a run is never silently truncated). With ``until``, the clock ends there.
        """
        ran = 0
        while self._heap:
            if until is not None and self._heap[0][0] > until:
                break
            if ran >= max_events:
                raise SimulationError(
                    f"max_events={max_events} reached at t={self.now} with {self.pending} "
                    "events pending (livelock, or raise max_events)"
                )
            if self.step():
                ran += 1
        if until is not None and until > self.now:
            self.now = float(until)
        return ran
