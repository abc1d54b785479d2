"""Seeded failure and join traces for the simulated decentralized world.

A trace is a fixed list of events ``(step, target, kind)``: at training step ``step`` the stage
(or node) ``target`` fails (``kind == "fail"``) or comes back / joins (``kind == "join"``).
Traces are generated up front from a dedicated seeded generator, so every method of a comparison
replays the *identical* failures; CheckFree's reference code draws them from one shared global
RNG, so its traces silently differ between methods.

Failure models:

* :func:`bernoulli_trace`: every step every eligible target fails independently with ``p_iter``.
* :func:`hourly_trace`: the same with ``p_iter`` from an hourly rate ``h`` (CheckFree's 5, 10, 16
  or 33 %/hour), ``p_iter = 1 - (1 - h) ** (iteration_seconds / 3600)``.
* :func:`mtbf_trace`: per target a Poisson process in wall-clock time (exponential times between
  failures with mean ``mtbf_seconds``), optionally with a rejoin ``downtime_steps`` later.
* :func:`burst_trace`: correlated bursts that take down several (by default adjacent) targets
  in the same step.
* :func:`with_rejoins`: adds a join ``downtime_steps`` after every failure of any trace.
* :meth:`FailureTrace.from_csv`: replays a recorded trace (e.g. spot-instance preemptions).

Traces combine with :meth:`FailureTrace.merge` and :meth:`FailureTrace.restrict` (e.g. keep only
interior stages, the only ones plain CheckFree can recover).
"""

import csv
import dataclasses
import math
import operator
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

KINDS = ("fail", "join")
TARGET_KINDS = ("stage", "node")
CSV_HEADER = "step,target,kind"
JSON_FORMAT = "decjax.failure_trace"
JSON_VERSION = 1
SECONDS_PER_HOUR = 3600.0

# Within one (step, target) a join sorts before a failure: a stage that rejoins at a step can fail
# again during that same step, never the other way round.
_KIND_ORDER = {"join": 0, "fail": 1}
# One independent stream per generator family, so e.g. a Bernoulli trace and a burst trace built
# with the same seed are not correlated when merged.
_STREAM_BERNOULLI = 1
_STREAM_MTBF = 2
_STREAM_BURST = 3


# ---------------------------------------------------------------------------------------------
# Argument checks.


def _as_int(name: str, value: Any, minimum: int) -> int:
    """Returns ``value`` as an int ``>= minimum``; bools and non-integral numbers are refused."""
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    try:
        result = operator.index(value)
    except TypeError:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}") from None
    if result < minimum:
        raise ValueError(f"{name}={result} must be an integer >= {minimum}")
    return result


def _as_float(name: str, value: Any) -> float:
    """Returns ``value`` as a finite float."""
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be a finite number")
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a finite number") from None
    if not math.isfinite(result):
        raise ValueError(f"{name}={value!r} must be a finite number")
    return result


def _as_positive(name: str, value: Any) -> float:
    result = _as_float(name, value)
    if result <= 0:
        raise ValueError(f"{name}={value!r} must be > 0")
    return result


def _as_probability(name: str, value: Any, *, include_one: bool = True) -> float:
    try:
        result = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        result = math.nan
    # Written so that NaN (and anything non-numeric) fails the range test too.
    in_range = 0 <= result <= 1 if include_one else 0 <= result < 1
    if not in_range:
        allowed = "[0, 1]" if include_one else "[0, 1)"
        raise ValueError(f"{name}={value!r} is outside the allowed range {allowed}")
    return result


def _check_target_kind(target_kind: Any) -> str:
    if target_kind not in TARGET_KINDS:
        raise ValueError(
            f"target_kind={target_kind!r} is not allowed: one of {', '.join(TARGET_KINDS)}"
        )
    return target_kind


def _range_message(target: int, n_targets: int, target_kind: str) -> str:
    return (
        f"trace refers to {target_kind} {target} but there are only {n_targets} "
        f"{target_kind}s (0..{n_targets - 1})"
    )


def _eligible(targets: Iterable[int] | None, n_targets: int, target_kind: str) -> np.ndarray:
    """Sorted unique eligible target indices, all targets when ``targets is None``."""
    if targets is None:
        return np.arange(n_targets, dtype=np.int64)
    values = [_as_int("targets", t, 0) for t in targets]
    for t in values:
        if t >= n_targets:
            raise ValueError(f"targets: {_range_message(t, n_targets, target_kind)}")
    return np.unique(np.asarray(values, dtype=np.int64))


def _rng(seed: Any, stream: int, *, name: str = "seed") -> np.random.SeedSequence:
    """A dedicated seed sequence for one generator family; never touches global RNG state."""
    return np.random.SeedSequence(_as_int(name, seed, 0), spawn_key=(stream,))


# ---------------------------------------------------------------------------------------------
# Rate conversions.


def hourly_to_per_iteration(hourly_rate: float, iteration_seconds: float) -> float:
    """Probability that a target fails within one iteration, given its hourly failure rate.

    Args:
        hourly_rate: probability ``h`` in ``[0, 1)`` that a target fails within one hour.
        iteration_seconds: wall-clock length of one iteration, ``> 0``.

    Returns:
        ``1 - (1 - h) ** (iteration_seconds / 3600)``.

    Raises:
        ValueError: ``hourly_rate`` outside ``[0, 1)`` or ``iteration_seconds <= 0``.
    """
    h = _as_probability("hourly_rate", hourly_rate, include_one=False)
    t = _as_positive("iteration_seconds", iteration_seconds)
    # expm1/log1p keep full precision for the tiny per-iteration probabilities.
    return float(-math.expm1(math.log1p(-h) * t / SECONDS_PER_HOUR))


def implied_iteration_seconds(hourly_rate: float, p_iter: float) -> float:
    """Iteration length at which ``hourly_rate`` maps to ``p_iter`` (inverse of the mapping).

    Raises:
        ValueError: ``hourly_rate`` or ``p_iter`` outside ``(0, 1)``.
    """
    h = _as_probability("hourly_rate", hourly_rate, include_one=False)
    p = _as_probability("p_iter", p_iter, include_one=False)
    if h == 0 or p == 0:
        raise ValueError(f"hourly_rate={hourly_rate!r} and p_iter={p_iter!r} must both be > 0")
    return SECONDS_PER_HOUR * math.log1p(-p) / math.log1p(-h)


def hourly_to_mtbf_seconds(hourly_rate: float) -> float:
    """Mean time between failures (seconds) of a Poisson process with this hourly rate.

    Raises:
        ValueError: ``hourly_rate`` outside ``(0, 1)``.
    """
    h = _as_probability("hourly_rate", hourly_rate, include_one=False)
    if h == 0:
        raise ValueError("hourly_rate=0 has no finite mean time between failures; use > 0")
    return -SECONDS_PER_HOUR / math.log1p(-h)


def interior_targets(n_targets: int) -> np.ndarray:
    """Targets ``1..n_targets-2``: the stages with two neighbours, which CheckFree can recover."""
    n = _as_int("n_targets", n_targets, 1)
    return np.arange(1, max(n - 1, 1), dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# The trace.


def _int_array(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D array of integers, got {arr.dtype}{arr.shape}")
    return arr.astype(np.int64)


def _kind_array(kinds: Any) -> np.ndarray:
    raw = np.asarray(kinds)
    if raw.size == 0:
        return np.zeros(0, dtype="<U4")
    if raw.ndim != 1:
        raise ValueError(f"kinds must be a 1-D array of strings, got shape {raw.shape}")
    bad = sorted({repr(k) for k in raw.tolist() if k not in KINDS})
    if bad:
        raise ValueError(f"kinds has {', '.join(bad)}; allowed: {', '.join(KINDS)}")
    return raw.astype("<U4")


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(arr)
    arr.setflags(write=False)
    return arr


@dataclasses.dataclass(frozen=True, eq=False)
class FailureTrace:
    """An immutable, validated list of fail/join events over ``n_steps`` steps.

    Events are stored sorted by ``(step, target)``, joins before failures within one
    ``(step, target)``; the constructor sorts its input. A target can fail at most once and join
    at most once per step.

    Attributes:
        n_targets: number of stages (or nodes); events name targets ``0..n_targets-1``.
        n_steps: number of training steps; events happen at steps ``0..n_steps-1``.
        steps: ``int64[K]`` step of each event.
        targets: ``int64[K]`` target of each event.
        kinds: ``str[K]`` kind of each event, ``"fail"`` or ``"join"``.
        target_kind: ``"stage"`` or ``"node"``: what the targets index.
        description: how the trace was made, for logs and plots.
        seed: the generator seed, ``None`` for recorded or hand-written traces.
    """

    n_targets: int
    n_steps: int
    steps: np.ndarray = dataclasses.field(repr=False)
    targets: np.ndarray = dataclasses.field(repr=False)
    kinds: np.ndarray = dataclasses.field(repr=False)
    target_kind: str = "stage"
    description: str = ""
    seed: int | None = None
    # offsets[s]:offsets[s + 1] is the slice of events at step s, so lookups are O(1).
    _offsets: np.ndarray = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)
        set_("n_targets", _as_int("n_targets", self.n_targets, 1))
        set_("n_steps", _as_int("n_steps", self.n_steps, 1))
        _check_target_kind(self.target_kind)
        if not isinstance(self.description, str):
            raise ValueError(f"description={self.description!r} must be a string")
        if self.seed is not None:
            set_("seed", _as_int("seed", self.seed, 0))
        steps = _int_array("steps", self.steps)
        targets = _int_array("targets", self.targets)
        kinds = _kind_array(self.kinds)
        if not len(steps) == len(targets) == len(kinds):
            raise ValueError(
                f"steps, targets and kinds must have equal lengths, got "
                f"{len(steps)}, {len(targets)} and {len(kinds)}"
            )
        self._check_ranges(steps, targets)
        order_key = np.where(kinds == "join", _KIND_ORDER["join"], _KIND_ORDER["fail"])
        order = np.lexsort((order_key, targets, steps))
        steps, targets, kinds, order_key = (a[order] for a in (steps, targets, kinds, order_key))
        dup = (np.diff(steps) == 0) & (np.diff(targets) == 0) & (np.diff(order_key) == 0)
        if dup.any():
            i = int(np.argmax(dup))
            raise ValueError(
                f"trace has a duplicate event: {self.target_kind} {targets[i]} "
                f"{kinds[i]} at step {steps[i]} twice"
            )
        set_("steps", _readonly(steps))
        set_("targets", _readonly(targets))
        set_("kinds", _readonly(kinds))
        offsets = np.searchsorted(steps, np.arange(self.n_steps + 1, dtype=np.int64), side="left")
        set_("_offsets", _readonly(offsets.astype(np.int64)))

    def _check_ranges(self, steps: np.ndarray, targets: np.ndarray) -> None:
        bad_targets = targets[(targets < 0) | (targets >= self.n_targets)]
        if bad_targets.size:
            raise ValueError(_range_message(int(bad_targets[0]), self.n_targets, self.target_kind))
        bad_steps = steps[(steps < 0) | (steps >= self.n_steps)]
        if bad_steps.size:
            raise ValueError(
                f"trace has an event at step {int(bad_steps[0])} but n_steps={self.n_steps} "
                f"allows steps 0..{self.n_steps - 1}"
            )

    # -- comparisons ------------------------------------------------------------------------

    def _key(self) -> tuple:
        return (self.n_targets, self.n_steps, self.target_kind, self.description, self.seed)

    def same_events(self, other: "FailureTrace") -> bool:
        """Whether both traces have identical events (metadata such as description ignored)."""
        return (
            isinstance(other, FailureTrace)
            and self.n_targets == other.n_targets
            and self.n_steps == other.n_steps
            and self.target_kind == other.target_kind
            and np.array_equal(self.steps, other.steps)
            and np.array_equal(self.targets, other.targets)
            and np.array_equal(self.kinds, other.kinds)
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FailureTrace):
            return NotImplemented
        return self._key() == other._key() and self.same_events(other)

    def __hash__(self) -> int:
        return hash(
            (self._key(), self.steps.tobytes(), self.targets.tobytes(), self.kinds.tobytes())
        )

    def __len__(self) -> int:
        return int(self.steps.shape[0])

    # -- lookups ----------------------------------------------------------------------------

    def _slice(self, step: int) -> slice:
        s = _as_int("step", step, 0)
        if s >= self.n_steps:
            raise ValueError(f"step={s} is outside the trace's steps 0..{self.n_steps - 1}")
        return slice(int(self._offsets[s]), int(self._offsets[s + 1]))

    def at(self, step: int) -> list[tuple[int, str]]:
        """Events at ``step`` as ``(target, kind)`` pairs, sorted by target (joins first)."""
        sl = self._slice(step)
        return list(zip(self.targets[sl].tolist(), self.kinds[sl].tolist(), strict=True))

    def failures_at(self, step: int) -> np.ndarray:
        """``int64`` targets that fail at ``step``, ascending."""
        sl = self._slice(step)
        return self.targets[sl][self.kinds[sl] == "fail"]

    def joins_at(self, step: int) -> np.ndarray:
        """``int64`` targets that (re)join at ``step``, ascending."""
        sl = self._slice(step)
        return self.targets[sl][self.kinds[sl] == "join"]

    def count(self, kind: str = "fail") -> int:
        """Number of events of ``kind`` (``"fail"`` or ``"join"``)."""
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not allowed: one of {', '.join(KINDS)}")
        return int(np.count_nonzero(self.kinds == kind))

    def events(self) -> list[tuple[int, int, str]]:
        """All events as ``(step, target, kind)`` tuples in trace order."""
        return list(
            zip(self.steps.tolist(), self.targets.tolist(), self.kinds.tolist(), strict=True)
        )

    # -- combinators ------------------------------------------------------------------------

    def merge(self, other: "FailureTrace") -> "FailureTrace":
        """Union of both traces' events; an event present in both is kept once.

        Raises:
            ValueError: the traces differ in ``n_targets``, ``n_steps`` or ``target_kind``.
        """
        if not isinstance(other, FailureTrace):
            raise ValueError(f"other must be a FailureTrace, got {type(other).__name__}")
        for name in ("n_targets", "n_steps", "target_kind"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise ValueError(f"cannot merge traces with different {name}: {mine} vs {theirs}")
        events = sorted(set(self.events()) | set(other.events()))
        return self._with_events(
            events,
            description=" + ".join(d for d in (self.description, other.description) if d),
            seed=self.seed if self.seed == other.seed else None,
        )

    def restrict(self, targets: Iterable[int]) -> "FailureTrace":
        """Keeps only the events of ``targets`` (indices keep their meaning).

        Example: ``trace.restrict(interior_targets(trace.n_targets))`` drops the first and last
        stage, which plain CheckFree cannot recover.
        """
        keep = _eligible(targets, self.n_targets, self.target_kind)
        mask = np.isin(self.targets, keep)
        label = f"{self.target_kind}s {keep.tolist()}"
        return dataclasses.replace(
            self,
            steps=self.steps[mask],
            targets=self.targets[mask],
            kinds=self.kinds[mask],
            description=f"{self.description} restricted to {label}".strip(),
        )

    def _with_events(self, events: list[tuple[int, int, str]], **changes: Any) -> "FailureTrace":
        steps = [e[0] for e in events]
        targets = [e[1] for e in events]
        kinds = [e[2] for e in events]
        return dataclasses.replace(
            self,
            steps=np.asarray(steps, dtype=np.int64),
            targets=np.asarray(targets, dtype=np.int64),
            kinds=np.asarray(kinds, dtype="<U4"),
            **changes,
        )

    # -- serialisation ----------------------------------------------------------------------

    def to_csv_string(self) -> str:
        """The CSV text written by :meth:`to_csv`: a header line then one ``step,target,kind``
        line per event, ``\\n`` line endings."""
        lines = [CSV_HEADER]
        lines += [f"{s},{t},{k}" for s, t, k in self.events()]
        return "\n".join(lines) + "\n"

    def to_csv(self, path: str | os.PathLike) -> None:
        """Writes the events as CSV; the bytes depend only on the events (deterministic)."""
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(self.to_csv_string())

    @classmethod
    def from_csv(
        cls,
        path: str | os.PathLike,
        *,
        n_targets: int,
        n_steps: int,
        target_kind: str = "stage",
        description: str | None = None,
    ) -> "FailureTrace":
        """Reads a CSV trace with a header naming the columns ``step``, ``target`` and ``kind``.

        Extra columns are ignored, blank lines and lines starting with ``#`` are skipped, and a
        missing ``kind`` column means every event is a failure (as in plain preemption logs).

        Raises:
            ValueError: missing header columns, non-integer fields, unknown kinds, or events
                outside ``n_targets`` / ``n_steps``; the message names the file and line.
        """
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
        try:
            return cls.from_csv_string(
                text,
                n_targets=n_targets,
                n_steps=n_steps,
                target_kind=target_kind,
                description=os.fspath(path) if description is None else description,
            )
        except ValueError as err:
            raise ValueError(f"{os.fspath(path)}: {err}") from None

    @classmethod
    def from_csv_string(
        cls,
        text: str,
        *,
        n_targets: int,
        n_steps: int,
        target_kind: str = "stage",
        description: str = "csv",
    ) -> "FailureTrace":
        """Parses CSV text in the format of :meth:`from_csv`."""
        numbered = [
            (i, line)
            for i, line in enumerate(text.splitlines(), start=1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
        if not numbered:
            raise ValueError(f"no header line; expected {CSV_HEADER!r}")
        header_line, header = numbered[0]
        columns = [c.strip() for c in next(csv.reader([header]))]
        for needed in ("step", "target"):
            if needed not in columns:
                raise ValueError(
                    f"line {header_line}: header {header!r} has no {needed!r} column; "
                    f"expected {CSV_HEADER!r}"
                )
        col = {name: columns.index(name) for name in ("step", "target", "kind") if name in columns}
        steps, targets, kinds = [], [], []
        for line_no, line in numbered[1:]:
            row = next(csv.reader([line]))
            if len(row) < len(columns):
                raise ValueError(f"line {line_no}: expected {len(columns)} fields, got {row}")
            for name, out in (("step", steps), ("target", targets)):
                field = row[col[name]].strip()
                try:
                    out.append(int(field))
                except ValueError:
                    raise ValueError(
                        f"line {line_no}: {name} {field!r} is not an integer"
                    ) from None
            kind = row[col["kind"]].strip() if "kind" in col else "fail"
            if kind not in KINDS:
                raise ValueError(
                    f"line {line_no}: kind {kind!r} is not allowed: one of {', '.join(KINDS)}"
                )
            kinds.append(kind)
        return cls(
            n_targets=n_targets,
            n_steps=n_steps,
            steps=np.asarray(steps, dtype=np.int64),
            targets=np.asarray(targets, dtype=np.int64),
            kinds=np.asarray(kinds, dtype="<U4"),
            target_kind=target_kind,
            description=description,
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict: metadata plus ``events`` as ``[step, target, kind]`` lists."""
        return {
            "format": JSON_FORMAT,
            "version": JSON_VERSION,
            "n_targets": self.n_targets,
            "n_steps": self.n_steps,
            "target_kind": self.target_kind,
            "description": self.description,
            "seed": self.seed,
            "events": [list(e) for e in self.events()],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "FailureTrace":
        """Inverse of :meth:`to_json`.

        Raises:
            ValueError: not a trace dict, a missing field or a malformed event.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"data must be a dict from FailureTrace.to_json, got {type(data)}")
        if data.get("format") != JSON_FORMAT or data.get("version") != JSON_VERSION:
            raise ValueError(
                f"data has format={data.get('format')!r} version={data.get('version')!r}; "
                f"allowed: format={JSON_FORMAT!r} version={JSON_VERSION}"
            )
        for name in ("n_targets", "n_steps", "target_kind", "events"):
            if name not in data:
                raise ValueError(f"data has no {name!r} field")
        events = data["events"]
        for i, event in enumerate(events):
            if not isinstance(event, list | tuple) or len(event) != 3:
                raise ValueError(f"data['events'][{i}]={event!r} must be [step, target, kind]")
        return cls(
            n_targets=data["n_targets"],
            n_steps=data["n_steps"],
            # No dtype: a float or string step must fail validation, not be truncated.
            steps=np.asarray([e[0] for e in events]),
            targets=np.asarray([e[1] for e in events]),
            kinds=np.asarray([e[2] for e in events]),
            target_kind=data["target_kind"],
            description=data.get("description", ""),
            seed=data.get("seed"),
        )

    def summary(self) -> str:
        """One line: description, event counts, size and seed."""
        seed = "recorded" if self.seed is None else f"seed {self.seed}"
        return (
            f"{self.description or 'trace'}: {self.count('fail')} failures, "
            f"{self.count('join')} joins over {self.n_targets} {self.target_kind}s x "
            f"{self.n_steps} steps ({seed})"
        )


# ---------------------------------------------------------------------------------------------
# Generators.


def _trace(
    n_targets: int,
    n_steps: int,
    steps: np.ndarray,
    targets: np.ndarray,
    kind: str,
    target_kind: str,
    description: str,
    seed: int,
) -> FailureTrace:
    return FailureTrace(
        n_targets=n_targets,
        n_steps=n_steps,
        steps=steps,
        targets=targets,
        kinds=np.full(len(steps), kind, dtype="<U4"),
        target_kind=target_kind,
        description=description,
        seed=seed,
    )


def bernoulli_trace(
    n_targets: int,
    n_steps: int,
    p_iter: float,
    seed: int,
    *,
    targets: Iterable[int] | None = None,
    target_kind: str = "stage",
) -> FailureTrace:
    """Every step, every eligible target fails independently with probability ``p_iter``.

    Several targets, adjacent ones included, can fail in the same step. The uniforms are drawn
    for all targets even when ``targets`` restricts eligibility, so the restricted trace is
    exactly ``bernoulli_trace(...).restrict(targets)``.

    Args:
        n_targets: number of stages (or nodes), ``>= 1``.
        n_steps: number of steps, ``>= 1``.
        p_iter: per-step failure probability in ``[0, 1]``.
        seed: non-negative integer seed.
        targets: the targets that can fail; all when ``None``.
        target_kind: ``"stage"`` or ``"node"``.
    """
    n_targets = _as_int("n_targets", n_targets, 1)
    n_steps = _as_int("n_steps", n_steps, 1)
    p = _as_probability("p_iter", p_iter)
    target_kind = _check_target_kind(target_kind)
    eligible = _eligible(targets, n_targets, target_kind)
    rng = np.random.default_rng(_rng(seed, _STREAM_BERNOULLI))
    fails = rng.random((n_steps, n_targets)) < p
    mask = np.zeros(n_targets, dtype=bool)
    mask[eligible] = True
    fails &= mask[None, :]
    # nonzero walks row-major, so events come out sorted by (step, target).
    steps, tgts = np.nonzero(fails)
    return _trace(
        n_targets, n_steps, steps, tgts, "fail", target_kind, f"bernoulli p_iter={p:g}", seed
    )


def hourly_trace(
    n_targets: int,
    n_steps: int,
    hourly_rate: float,
    iteration_seconds: float,
    seed: int,
    **kwargs: Any,
) -> FailureTrace:
    """:func:`bernoulli_trace` with ``p_iter = hourly_to_per_iteration(hourly_rate, ...)``.

    ``kwargs`` (``targets``, ``target_kind``) go to :func:`bernoulli_trace`.
    """
    p = hourly_to_per_iteration(hourly_rate, iteration_seconds)
    trace = bernoulli_trace(n_targets, n_steps, p, seed, **kwargs)
    description = (
        f"hourly {float(hourly_rate):g} @ {float(iteration_seconds):g}s/step (p_iter={p:.3g})"
    )
    return dataclasses.replace(trace, description=description)


def _poisson_steps(
    rng: np.random.Generator, mtbf_seconds: float, iteration_seconds: float, n_steps: int
) -> np.ndarray:
    """Distinct steps that contain at least one point of a Poisson process of mean gap ``mtbf``."""
    horizon = n_steps * iteration_seconds
    expected = horizon / mtbf_seconds
    times = np.zeros(0)
    last = 0.0
    while last < horizon:
        # Draw a generous batch so one round almost always covers the horizon.
        batch = int(expected + 6 * math.sqrt(expected) + 16)
        chunk = last + np.cumsum(rng.exponential(mtbf_seconds, size=batch))
        times = np.concatenate([times, chunk])
        last = float(chunk[-1])
    steps = np.floor(times[times < horizon] / iteration_seconds).astype(np.int64)
    # Several failures inside one iteration count once: a stage is either lost that step or not.
    return np.unique(steps[steps < n_steps])


def mtbf_trace(
    n_targets: int,
    n_steps: int,
    mtbf_seconds: float,
    iteration_seconds: float,
    seed: int,
    *,
    downtime_steps: int | None = None,
    targets: Iterable[int] | None = None,
    target_kind: str = "stage",
) -> FailureTrace:
    """Per target, failures at the points of a Poisson process in wall-clock time.

    Times between failures are exponential with mean ``mtbf_seconds``; a failure at time ``t``
    happens at step ``floor(t / iteration_seconds)`` (two in one step count once). Each target
    has its own child seed, so its failures do not depend on ``n_targets`` or ``targets``.

    With ``downtime_steps``, a target that fails at step ``s`` rejoins at step
    ``s + downtime_steps`` (when that is before ``n_steps``) and cannot fail while down. By the
    memorylessness of the exponential this is the same as restarting its clock at the rejoin.

    Args:
        n_targets: number of stages (or nodes), ``>= 1``.
        n_steps: number of steps, ``>= 1``.
        mtbf_seconds: mean time between failures of one target, ``> 0``.
        iteration_seconds: wall-clock length of one step, ``> 0``.
        seed: non-negative integer seed.
        downtime_steps: steps a failed target stays down before rejoining (``>= 1``), or
            ``None`` for no join events.
        targets: the targets that can fail; all when ``None``.
        target_kind: ``"stage"`` or ``"node"``.
    """
    n_targets = _as_int("n_targets", n_targets, 1)
    n_steps = _as_int("n_steps", n_steps, 1)
    mtbf = _as_positive("mtbf_seconds", mtbf_seconds)
    t_iter = _as_positive("iteration_seconds", iteration_seconds)
    target_kind = _check_target_kind(target_kind)
    eligible = _eligible(targets, n_targets, target_kind)
    children = _rng(seed, _STREAM_MTBF).spawn(n_targets)
    per_target = [
        _poisson_steps(np.random.default_rng(children[t]), mtbf, t_iter, n_steps) for t in eligible
    ]
    steps = np.concatenate([np.zeros(0, np.int64), *per_target])
    tgts = np.repeat(eligible, [len(s) for s in per_target])
    trace = _trace(
        n_targets,
        n_steps,
        steps,
        tgts,
        "fail",
        target_kind,
        f"mtbf {mtbf:g}s @ {t_iter:g}s/step",
        seed,
    )
    return trace if downtime_steps is None else with_rejoins(trace, downtime_steps)


def burst_trace(
    n_targets: int,
    n_steps: int,
    burst_prob: float,
    burst_size: int,
    seed: int,
    *,
    adjacent: bool = True,
    target_kind: str = "stage",
) -> FailureTrace:
    """Correlated failures: each step, with probability ``burst_prob``, ``burst_size`` targets
    fail together.

    With ``adjacent`` the burst is a run of neighbouring targets ``start..start+burst_size-1``
    with a uniform start (pipelines are linear, so runs do not wrap around); otherwise it is a
    uniformly random subset. Merge with a background trace for bursts on top of independent
    failures, and :meth:`FailureTrace.restrict` to keep some targets only.

    Args:
        n_targets: number of stages (or nodes), ``>= 1``.
        n_steps: number of steps, ``>= 1``.
        burst_prob: per-step burst probability in ``[0, 1]``.
        burst_size: targets per burst, in ``1..n_targets``.
        seed: non-negative integer seed.
        adjacent: a run of neighbouring targets rather than a random subset.
        target_kind: ``"stage"`` or ``"node"``.
    """
    n_targets = _as_int("n_targets", n_targets, 1)
    n_steps = _as_int("n_steps", n_steps, 1)
    p = _as_probability("burst_prob", burst_prob)
    size = _as_int("burst_size", burst_size, 1)
    if size > n_targets:
        raise ValueError(f"burst_size={size} must be in 1..n_targets={n_targets}")
    target_kind = _check_target_kind(target_kind)
    rng = np.random.default_rng(_rng(seed, _STREAM_BURST))
    burst_steps = np.nonzero(rng.random(n_steps) < p)[0]
    n_bursts = len(burst_steps)
    if adjacent:
        starts = rng.integers(0, n_targets - size + 1, size=n_bursts)
        members = starts[:, None] + np.arange(size)[None, :]
    else:
        # The first `size` entries of a random permutation: a uniform subset per burst.
        members = np.argsort(rng.random((n_bursts, n_targets)), axis=1)[:, :size]
    steps = np.repeat(burst_steps, size)
    mode = "adjacent" if adjacent else "random"
    return _trace(
        n_targets,
        n_steps,
        steps,
        members.reshape(-1).astype(np.int64),
        "fail",
        target_kind,
        f"burst p={p:g} size={size} {mode}",
        seed,
    )


def with_rejoins(trace: FailureTrace, downtime_steps: int) -> FailureTrace:
    """Adds a join ``downtime_steps`` after each failure; failures while down are dropped.

    A target failing at step ``s`` is down for steps ``s..s+downtime_steps-1`` and rejoins at
    ``s + downtime_steps`` (no join when that is past the end; it stays down). It may fail again
    from the rejoin step on.

    Raises:
        ValueError: ``downtime_steps < 1`` or ``trace`` already has join events.
    """
    d = _as_int("downtime_steps", downtime_steps, 1)
    if trace.count("join"):
        raise ValueError("trace already has join events; with_rejoins needs a failures-only trace")
    events: list[tuple[int, int, str]] = []
    down_until = np.full(trace.n_targets, -1, dtype=np.int64)
    for step, target, _ in trace.events():
        if step < down_until[target]:
            continue
        events.append((step, target, "fail"))
        down_until[target] = step + d
        if step + d < trace.n_steps:
            events.append((step + d, target, "join"))
    return trace._with_events(
        sorted(events), description=f"{trace.description}, rejoin after {d} steps".lstrip(", ")
    )


def empirical_rate(trace: FailureTrace, eligible_targets: Iterable[int] | None = None) -> float:
    """Failures per target-step over ``eligible_targets`` (all targets when ``None``)."""
    eligible = _eligible(eligible_targets, trace.n_targets, trace.target_kind)
    if eligible.size == 0:
        raise ValueError("eligible_targets must name at least one target")
    fails = np.count_nonzero((trace.kinds == "fail") & np.isin(trace.targets, eligible))
    return float(fails) / (eligible.size * trace.n_steps)
