"""Per-stage compute time per microbatch, and the sizes that drive communication time.

A :class:`ComputeCost` gives the simulated seconds one node spends on one microbatch: forward
through a body stage, backward through it, and the loss step (head + de-embedding). Times are
either the SkipPipe/CheckFree reference constants (:meth:`ComputeCost.reference`) or FLOP counts
divided by a measured throughput (:meth:`ComputeCost.from_flops`). Stragglers are modelled by
multiplying times with mean-one log-normal factors (:meth:`ComputeCost.sample`).
"""

import dataclasses
import operator
import time
from collections.abc import Callable, Sequence
from typing import Self

import numpy as np

from decjax.sim._checks import count, index, nonneg, positive

# skippipe's measured compute seconds per sample per layer, the same for every region.
REFERENCE_SECONDS_PER_SAMPLE_LAYER = 0.055


def _vector(value, name: str, *, positive: bool) -> np.ndarray:
    """``value`` as a non-empty finite float64 vector, entries >= 0 (or > 0)."""
    try:
        v = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a numeric 1-D array, got {value!r}") from None
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array [S], got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite, got {v}")
    if positive and np.any(v <= 0):
        raise ValueError(f"{name} must be > 0 for every stage, got {v}")
    if np.any(v < 0):
        raise ValueError(f"{name} must be >= 0 for every stage, got {v}")
    return v


def _shape(shape) -> tuple[int, ...]:
    """``shape`` (an int or a sequence of ints) as a tuple of ints."""
    try:
        if isinstance(shape, Sequence | np.ndarray):
            dims = tuple(operator.index(d) for d in shape)
        else:
            dims = (operator.index(shape),)
    except TypeError:
        raise ValueError(f"shape must be an int or a tuple of ints, got {shape!r}") from None
    if any(isinstance(d, bool) for d in (shape, *dims)):
        raise ValueError(f"shape must be an int or a tuple of ints, got {shape!r}")
    return dims


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: array field has no scalar ==
class ComputeCost:
    """Seconds of compute per microbatch for each body stage and for the loss step.

    Attributes:
        forward_s: ``[S]`` seconds for one microbatch forward through each body stage.
        backward_factor: backward time as a multiple of the same stage's forward time.
        loss_factor: loss + de-embedding time as a multiple of the mean stage forward time.
        straggler_sigma: log-normal sigma of the per-event slowdown multipliers; 0 = none.
    """

    forward_s: np.ndarray
    backward_factor: float = 1.5
    loss_factor: float = 0.25
    straggler_sigma: float = 0.0

    def __post_init__(self):
        forward = _vector(self.forward_s, "forward_s", positive=False)
        forward.flags.writeable = False  # a frozen dataclass should not hide a mutable array
        object.__setattr__(self, "forward_s", forward)
        object.__setattr__(self, "backward_factor",
                           nonneg(self.backward_factor, "backward_factor"))
        object.__setattr__(self, "loss_factor", nonneg(self.loss_factor, "loss_factor"))
        object.__setattr__(self, "straggler_sigma",
                           nonneg(self.straggler_sigma, "straggler_sigma"))

    @property
    def n_stages(self) -> int:
        """Number of body stages ``S``."""
        return int(self.forward_s.shape[0])

    def _stage(self, stage) -> int:
        return index(stage, "stage", self.n_stages)

    def forward(self, stage: int) -> float:
        """Seconds for one microbatch forward through body stage ``stage``."""
        return float(self.forward_s[self._stage(stage)])

    def backward(self, stage: int) -> float:
        """Seconds for one microbatch backward through body stage ``stage``."""
        return self.backward_factor * self.forward(stage)

    def loss(self) -> float:
        """Seconds for the loss step (head, de-embedding and loss gradient) of one microbatch."""
        return self.loss_factor * float(np.mean(self.forward_s))

    def sample(self, rng_or_seed: np.random.Generator | int, shape: int | Sequence[int]
               ) -> np.ndarray:
        """Straggler multipliers ``exp(sigma * z - sigma**2 / 2)``, ``z ~ N(0, 1)``; mean 1.

        Args:
            rng_or_seed: a numpy ``Generator`` (advanced in place) or a non-negative int seed
                (same seed, same draws).
            shape: output shape.

        Returns:
            float64 array of ``shape``; exactly ones when ``straggler_sigma == 0``.
        """
        if isinstance(rng_or_seed, np.random.Generator):
            rng = rng_or_seed
        elif (isinstance(rng_or_seed, int | np.integer) and not isinstance(rng_or_seed, bool)
              and rng_or_seed >= 0):
            rng = np.random.default_rng(rng_or_seed)
        else:
            raise ValueError("rng_or_seed must be a numpy Generator or a non-negative int, "
                             f"got {rng_or_seed!r}")
        dims = _shape(shape)
        if any(d < 0 for d in dims):
            raise ValueError(f"shape must have non-negative sizes, got {shape!r}")
        sigma = self.straggler_sigma
        if sigma == 0:
            return np.ones(dims)
        # The -sigma^2/2 shift makes E[multiplier] = 1, so sigma changes spread, not mean speed.
        return np.exp(sigma * rng.standard_normal(dims) - 0.5 * sigma**2)

    @classmethod
    def reference(cls, n_stages: int, layers_per_stage: int, samples_per_microbatch: int, *,
                  seconds_per_sample_layer: float = REFERENCE_SECONDS_PER_SAMPLE_LAYER,
                  straggler_sigma: float = 0.0) -> Self:
        """The SkipPipe/CheckFree simulator's compute model.

        Constants from gensyn-ai/skippipe ``schedulers/communication_costs.py``
        (``COMPUTATIONAL_COST``: 0.055 s per sample per layer in every region): forward
        ``w = 0.055 * layers * samples``, backward ``1.5 * w``, loss ``w / 4``. For example
        4 layers x 8 samples gives ``w = 1.76`` s, backward 2.64 s, loss 0.44 s.

        Args:
            n_stages: number of body stages ``S``.
            layers_per_stage: transformer layers in each stage.
            samples_per_microbatch: sequences per microbatch.
            seconds_per_sample_layer: compute seconds per sample per layer.
            straggler_sigma: log-normal straggler sigma (0 = deterministic).
        """
        n = count(n_stages, "n_stages")
        layers = count(layers_per_stage, "layers_per_stage")
        samples = count(samples_per_microbatch, "samples_per_microbatch")
        w = positive(seconds_per_sample_layer, "seconds_per_sample_layer") * layers * samples
        return cls(forward_s=np.full(n, w), backward_factor=1.5, loss_factor=0.25,
                   straggler_sigma=straggler_sigma)

    @classmethod
    def from_flops(cls, flops_per_microbatch_per_stage: Sequence[float] | np.ndarray,
                   flops_per_second: float, *, backward_factor: float = 2.0,
                   head_flops: float | None = None, loss_factor: float | None = None,
                   straggler_sigma: float = 0.0) -> Self:
        """Times from FLOP counts and a (measured) throughput.

        Forward time is ``forward FLOPs / flops_per_second``. Pass *forward* FLOPs (e.g. from
        :func:`stage_forward_flops`); a training step's FLOPs are about 3x that, so divide
        training FLOPs by 3. ``backward_factor`` defaults to 2.0 because backward does two
        matmuls per forward matmul (gradient w.r.t. the input and w.r.t. the weight).

        Args:
            flops_per_microbatch_per_stage: ``[S]`` forward FLOPs of one microbatch per stage.
            flops_per_second: sustained throughput of one node.
            backward_factor: backward time / forward time.
            head_flops: forward FLOPs of the loss head (see :func:`head_forward_flops`); the
                loss step then costs head forward + backward,
                ``(1 + backward_factor) * head_flops / flops_per_second``.
            loss_factor: alternatively, loss time / mean stage forward time; 0.25 (the reference
                ratio) when neither this nor ``head_flops`` is given.
            straggler_sigma: log-normal straggler sigma (0 = deterministic).
        """
        flops = _vector(flops_per_microbatch_per_stage, "flops_per_microbatch_per_stage",
                        positive=True)
        rate = positive(flops_per_second, "flops_per_second")
        backward_factor = nonneg(backward_factor, "backward_factor")
        if head_flops is not None and loss_factor is not None:
            raise ValueError("pass at most one of head_flops and loss_factor")
        if head_flops is not None:
            head = nonneg(head_flops, "head_flops")
            # loss() multiplies by the mean stage forward time, so express the head in its units.
            loss_factor = (1.0 + backward_factor) * head / float(np.mean(flops))
        elif loss_factor is None:
            loss_factor = 0.25
        return cls(forward_s=flops / rate, backward_factor=backward_factor,
                   loss_factor=loss_factor, straggler_sigma=straggler_sigma)


def stage_forward_flops(d_model: int, n_heads: int, layers_per_stage: int, d_ff: int,
                        seq_len: int, samples: int) -> int:
    """Matmul FLOPs of one body stage's forward pass for one microbatch.

    Per token and layer: ``2 * (4 d^2 + 3 d f)`` for the attention projections (q, k, v, o)
    and the gated MLP (gate, up, down), plus ``2 T d`` for causal attention (scores and the
    weighted sum each ``2 T d`` at full length, halved by the causal mask). Norms, softmax
    and elementwise ops are ignored. ``n_heads`` does not change the count; it is checked to
    divide ``d_model``.
    """
    d = count(d_model, "d_model")
    h = count(n_heads, "n_heads")
    if d % h:
        raise ValueError(f"n_heads must divide d_model, got d_model={d}, n_heads={h}")
    layers = count(layers_per_stage, "layers_per_stage")
    f = count(d_ff, "d_ff")
    t = count(seq_len, "seq_len")
    tokens = t * count(samples, "samples")
    per_token_layer = 2 * (4 * d * d + 3 * d * f) + 2 * t * d
    return layers * tokens * per_token_layer


def head_forward_flops(d_model: int, vocab: int, seq_len: int, samples: int) -> int:
    """Matmul FLOPs of the de-embedding (``[d] -> [vocab]`` logits) for one microbatch."""
    d = count(d_model, "d_model")
    v = count(vocab, "vocab")
    tokens = count(seq_len, "seq_len") * count(samples, "samples")
    return 2 * d * v * tokens


def activation_bytes(d_model: int, seq_len: int, samples: int, bytes_per_value: int = 4) -> int:
    """Bytes of one microbatch's ``[samples, T, d]`` activations (what a pipeline hop sends).

    The reference setting, d = 1024, T = 1024 in fp32, is 4 MiB per sample.
    """
    return (count(bytes_per_value, "bytes_per_value") * count(d_model, "d_model")
            * count(seq_len, "seq_len") * count(samples, "samples"))


def stage_param_bytes(d_model: int, d_ff: int, layers_per_stage: int,
                      bytes_per_value: int = 4) -> int:
    """Bytes of one body stage's matmul weights, ``layers * (4 d^2 + 3 d f)`` values.

    What a recovering node downloads to rebuild a stage; norm scales are negligible and ignored.
    """
    d = count(d_model, "d_model")
    f = count(d_ff, "d_ff")
    layers = count(layers_per_stage, "layers_per_stage")
    return count(bytes_per_value, "bytes_per_value") * layers * (4 * d * d + 3 * d * f)


def measure_flops_per_second(fn: Callable, *args, flops: float, repeats: int = 3) -> float:
    """Calibrates throughput: ``flops`` divided by the median wall time of ``fn(*args)``.

    Runs ``fn`` once to warm up (compilation), then ``repeats`` timed calls, each waited on
    with ``jax.block_until_ready`` so asynchronous dispatch does not hide the work.

    Args:
        fn: the (jitted) callable.
        *args: its arguments.
        flops: FLOPs one call performs.
        repeats: timed calls; the median is used.

    Returns:
        FLOPs per second.
    """
    # Local import: decjax.sim must stay importable without initializing JAX devices.
    import jax

    if not callable(fn):
        raise ValueError(f"fn must be callable, got {fn!r}")
    flops = positive(flops, "flops")
    repeats = count(repeats, "repeats")
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    if seconds <= 0:
        raise ValueError("fn ran faster than the timer resolution; give it a larger workload")
    return flops / seconds
