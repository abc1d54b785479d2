"""Network models: synchronous (bounded delay) and asynchronous (adversarial, fair).

Every message is wrapped in an :class:`Envelope` and counted per kind (``message.kind`` or the
class name) in :class:`MessageStats`, with a byte estimate from :func:`wire_size` (signatures
are 64-byte ``bytes`` and hashes 32-byte ``bytes``, so they count as 64 B and 32 B).

* :class:`SyncNetwork` ``(delta)``: delay in ``[0, delta]``, drawn from the seeded rng or chosen
  by an adversary hook; a delay outside the bound raises.
* :class:`AsyncNetwork` ``(scheduler, max_delay)``: a scheduler picks each delay or holds the
  message (returns ``None``) until :meth:`AsyncNetwork.release`. The default scheduler draws
  heavy-tailed (Pareto) delays. Fairness, i.e. every correct->correct message delivered within
  ``max_delay`` of sending, is checked by :meth:`Network.fairness_violations` at quiescence.

Adversary hooks on both: :meth:`Network.mark_faulty`, :meth:`Network.drop_if` (omission; only
applies to messages with a faulty sender or receiver), :meth:`Network.delay_until`, and
:meth:`Network.replay` (re-inject an old envelope).

Examples:
    >>> from decjax.payments.events import Node, Simulator
    >>> sim = Simulator(seed=1, network=SyncNetwork(delta=1.0))
    >>> a, b = sim.add_node(Node("a")), sim.add_node(Node("b"))
    >>> a.send("b", ("PING", 1))
    >>> sim.run(), sim.network.stats.count
    (1, {'tuple': 1})
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from decjax.payments.errors import ConfigError, SimulationError

if TYPE_CHECKING:
    import random

    from decjax.payments.events import Simulator

_INT_BYTES = 8


def wire_size(obj: Any) -> int:
    """Estimated encoded size of ``obj`` in bytes (bytes: len; int/float: 8; str: utf-8 len).

    Containers, dataclasses and NamedTuples sum their fields; an object with a ``wire_size()``
    method reports its own size.
    """
    if obj is None or isinstance(obj, bool):
        return 1
    if isinstance(obj, bytes | bytearray):
        return len(obj)
    if isinstance(obj, int | float):
        return _INT_BYTES
    if isinstance(obj, str):
        return len(obj.encode())
    own = getattr(obj, "wire_size", None)
    if callable(own):
        return int(own())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(wire_size(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, dict):
        return sum(wire_size(k) + wire_size(v) for k, v in obj.items())
    if isinstance(obj, tuple | list | frozenset | set):
        return sum(wire_size(x) for x in obj)
    raise SimulationError(f"wire_size: cannot size object of type {type(obj).__name__}")


def message_kind(message: Any) -> str:
    return str(getattr(message, "kind", type(message).__name__))


@dataclasses.dataclass(frozen=True)
class Envelope:
    """A message in flight; ``msg_id`` is unique per network and increases with send order."""

    msg_id: int
    src: str
    dst: str
    message: Any
    kind: str
    size: int
    sent_at: float
    replay_of: int | None = None


@dataclasses.dataclass
class MessageStats:
    """Message counts and byte estimates per kind (replays are counted separately)."""

    count: dict[str, int] = dataclasses.field(default_factory=dict)
    bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    dropped: int = 0
    replayed: int = 0

    def add(self, env: Envelope) -> None:
        self.count[env.kind] = self.count.get(env.kind, 0) + 1
        self.bytes[env.kind] = self.bytes.get(env.kind, 0) + env.size

    @property
    def total_messages(self) -> int:
        return sum(self.count.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def copy(self) -> MessageStats:
        return MessageStats(dict(self.count), dict(self.bytes), self.dropped, self.replayed)


class Network:
    """Base class: counting, tracing, adversary hooks; subclasses choose delays."""

    def __init__(self) -> None:
        self.sim: Simulator | None = None
        self.rng: random.Random | None = None
        self.stats = MessageStats()
        self.history: list[Envelope] = []
        self.delivered: dict[int, float] = {}
        self.max_correct_delay = 0.0
        self._faulty: set[str] = set()  # membership tests only: never iterated
        self._drop_rules: list[Callable[[Envelope], bool]] = []
        self._delay_rules: list[tuple[Callable[[Envelope], bool], float]] = []

    def attach(self, sim: Simulator) -> None:
        self.sim = sim
        self.rng = sim.rng_for(f"network/{type(self).__name__}")

    def _s(self) -> Simulator:
        if self.sim is None:
            raise SimulationError("network is not attached to a Simulator")
        return self.sim

    # -- adversary hooks -----------------------------------------------------------------------
    def mark_faulty(self, node_id: str) -> None:
        """Declare ``node_id`` faulty: its links lose delay/fairness guarantees."""
        self._faulty.add(node_id)

    def is_faulty(self, node_id: str) -> bool:
        return node_id in self._faulty

    def is_correct_link(self, env: Envelope) -> bool:
        return env.src not in self._faulty and env.dst not in self._faulty

    def drop_if(self, predicate: Callable[[Envelope], bool]) -> None:
        """Drop matching messages whose sender or receiver is faulty (omission faults)."""
        self._drop_rules.append(predicate)

    def delay_until(self, predicate: Callable[[Envelope], bool], time: float) -> None:
        """Deliver matching messages no earlier than ``time`` (sync: still bounded by delta)."""
        self._delay_rules.append((predicate, float(time)))

    def replay(self, msg_id: int, delay: float = 0.0) -> Envelope:
        """Re-inject the message of envelope ``msg_id`` (same src, dst, content) after ``delay``."""
        if not 0 <= msg_id < len(self.history):
            raise SimulationError(f"replay: unknown msg_id {msg_id}")
        old = self.history[msg_id]
        env = self._envelope(old.src, old.dst, old.message, replay_of=old.msg_id)
        self.stats.replayed += 1
        self._s().record("replay", msg_id=env.msg_id, of=old.msg_id, src=env.src, dst=env.dst)
        self._deliver_after(env, delay)
        return env

    # -- sending -------------------------------------------------------------------------------
    def _envelope(self, src: str, dst: str, message: Any, replay_of: int | None = None) -> Envelope:
        env = Envelope(len(self.history), src, dst, message, message_kind(message),
                       wire_size(message), self._s().now, replay_of)
        self.history.append(env)
        return env

    def send(self, src: str, dst: str, message: Any) -> Envelope:
        sim = self._s()
        env = self._envelope(src, dst, message)
        self.stats.add(env)
        sim.record("send", msg_id=env.msg_id, src=src, dst=dst, kind=env.kind, size=env.size)
        if not self.is_correct_link(env) and any(rule(env) for rule in self._drop_rules):
            self.stats.dropped += 1
            sim.record("drop", msg_id=env.msg_id)
            return env
        delay = self.choose_delay(env)
        if delay is None:
            sim.record("hold", msg_id=env.msg_id)
            return env
        for predicate, time in self._delay_rules:
            if predicate(env):
                delay = max(delay, time - sim.now)
        self.check_delay(env, delay)
        self._deliver_after(env, delay)
        return env

    def _deliver_after(self, env: Envelope, delay: float) -> None:
        sim = self._s()
        sim.schedule(delay, lambda: self._deliver(env))

    def _deliver(self, env: Envelope) -> None:
        sim = self._s()
        if env.replay_of is None:
            self.delivered[env.msg_id] = sim.now
            if self.is_correct_link(env):
                self.max_correct_delay = max(self.max_correct_delay, sim.now - env.sent_at)
        sim.record("deliver", msg_id=env.msg_id, src=env.src, dst=env.dst, kind=env.kind)
        sim.node(env.dst).receive(env.src, env.message)

    # -- subclass interface --------------------------------------------------------------------
    def choose_delay(self, env: Envelope) -> float | None:
        """Delay for ``env``; ``None`` holds it until released (async only)."""
        raise NotImplementedError

    def check_delay(self, env: Envelope, delay: float) -> None:
        if not delay >= 0:
            raise SimulationError(f"negative or NaN delay {delay!r} for msg {env.msg_id}")

    def fairness_violations(self) -> list[Envelope]:
        """Correct->correct messages not delivered (or delivered too late); call at quiescence."""
        return [e for e in self.history
                if e.replay_of is None and self.is_correct_link(e) and not self._on_time(e)]

    def _on_time(self, env: Envelope) -> bool:
        return env.msg_id in self.delivered


class SyncNetwork(Network):
    """Synchronous links: every correct->correct delay lies in ``[0, delta]``.

    Args:
      delta: the known delay bound Δ.
      adversary: optional ``adversary(env) -> delay``; its choices are checked against Δ.
    """

    def __init__(self, delta: float, adversary: Callable[[Envelope], float] | None = None):
        super().__init__()
        if not (delta > 0 and math.isfinite(delta)):
            raise ConfigError(f"delta must be a finite positive number, got {delta!r}")
        self.delta = float(delta)
        self.adversary = adversary

    def choose_delay(self, env: Envelope) -> float:
        if self.adversary is not None:
            return float(self.adversary(env))
        assert self.rng is not None
        return self.rng.uniform(0.0, self.delta)

    def check_delay(self, env: Envelope, delay: float) -> None:
        super().check_delay(env, delay)
        if self.is_correct_link(env) and delay > self.delta:
            raise SimulationError(
                f"sync bound broken: delay {delay} > delta {self.delta} for msg {env.msg_id} "
                f"({env.src} -> {env.dst}, {env.kind})"
            )

    def _on_time(self, env: Envelope) -> bool:
        at = self.delivered.get(env.msg_id)
        return at is not None and at - env.sent_at <= self.delta + 1e-12


class Scheduler(Protocol):
    """Adversarial scheduler of an :class:`AsyncNetwork`: a delay, or ``None`` to hold."""

    def delay(self, env: Envelope, net: AsyncNetwork) -> float | None: ...


class RandomScheduler:
    """Default scheduler: Pareto(alpha) heavy-tailed delays, ``scale * (X - 1)``, seeded."""

    def __init__(self, scale: float = 1.0, alpha: float = 1.5):
        if not (scale > 0 and alpha > 0):
            raise ConfigError(f"scale and alpha must be > 0, got scale={scale}, alpha={alpha}")
        self.scale, self.alpha = float(scale), float(alpha)

    def delay(self, env: Envelope, net: AsyncNetwork) -> float:
        assert net.rng is not None
        return self.scale * (net.rng.paretovariate(self.alpha) - 1.0)


class AsyncNetwork(Network):
    """Asynchronous links with an adversarial but fair scheduler.

    Args:
      scheduler: chooses delays or holds messages; default :class:`RandomScheduler`.
      max_delay: fairness bound. Drawn delays above it are capped for correct links; messages
        held past it (or never released) show up in :meth:`fairness_violations`.
    """

    def __init__(self, scheduler: Scheduler | None = None, max_delay: float = 1e6):
        super().__init__()
        if not max_delay > 0:
            raise ConfigError(f"max_delay must be > 0, got {max_delay!r}")
        self.scheduler = scheduler if scheduler is not None else RandomScheduler()
        self.max_delay = float(max_delay)
        self.held: dict[int, Envelope] = {}

    def choose_delay(self, env: Envelope) -> float | None:
        delay = self.scheduler.delay(env, self)
        if delay is None:
            self.held[env.msg_id] = env
            return None
        if self.is_correct_link(env):
            delay = min(float(delay), self.max_delay)
        return delay

    def release(self, msg_id: int, delay: float = 0.0) -> None:
        """Deliver a held message after ``delay``."""
        env = self.held.pop(msg_id, None)
        if env is None:
            raise SimulationError(f"release: message {msg_id} is not held")
        self._s().record("release", msg_id=msg_id)
        self._deliver_after(env, delay)

    def release_all(self, delay: float = 0.0) -> None:
        for msg_id in sorted(self.held):
            self.release(msg_id, delay)

    def _on_time(self, env: Envelope) -> bool:
        at = self.delivered.get(env.msg_id)
        return at is not None and at - env.sent_at <= self.max_delay + 1e-9
