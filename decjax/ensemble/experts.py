"""Expert specs, the compute budget, HDEE's three ensembles, d_ff padding and shape groups.

**Compute convention.** Training FLOPs ``C = 6 * N * D`` (Kaplan et al. 2020): ``N`` counts the
*non-embedding* parameters (every weight except the token embedding and the output head, as
HDEE's "92/113/134M" do), ``D`` the training tokens, and 6 = 2 (multiply-add) x 3 (forward +
backward). Every expert reads the same tokens per step, so ensembles compare by ``sum_i N_i
T_i``. ``N`` is linear in ``d_ff`` (SwiGLU holds ``3 * d_model * d_ff`` per layer), so
``d_ff_S + d_ff_L = 2 * d_ff_M`` or ``T_S + T_L = 2 * T_M`` leaves the budget exactly unchanged.

**Padding.** A SwiGLU expert zero-padded to a wider ``d_ff`` computes exactly the same function
(padded units output ``silu(0) * 0 = 0``) and its padded weights get exactly zero gradients, so
experts that differ only in ``d_ff`` can share one vmapped group; :func:`apply_d_ff_mask` keeps
the padded entries at zero against drift.

Example::

    base = LlamaConfig(vocab_size=258, d_model=128, n_heads=4, n_layers=4)
    groups = [(("licenses",), "easy"), (("man1",), "moderate"), (("stdlib",), "hard")]
    ensembles = hdee_ensembles(base, groups, d_ff=(384, 512, 640), steps=(300, 400, 500))
    print(check_budget(ensembles, tokens_per_step=16 * 128))
    for group in group_by_shape(ensembles["M_He-I_Ho"], max_pad_ratio=1.7):
        ...  # one vmapped training run per group (decjax.ensemble.train)
"""

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from decjax.models.llama import LlamaConfig
from decjax.models.staged import StagedLlama
from decjax.types import PyTree

DIFFICULTIES = ("easy", "moderate", "hard")
ENSEMBLE_NAMES = ("M_Ho-I_Ho", "M_He-I_Ho", "M_Ho-I_He")


def _positive_int(field: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{field}={value!r} must be a positive integer")
    return value


@dataclasses.dataclass(frozen=True)
class ExpertSpec:
    """One expert: its name, training domains, SwiGLU width and training steps.

    Attributes:
      name: unique name.
      domains: the domains it trains on.
      d_ff: SwiGLU hidden width (explicit; the only shape that differs between experts).
      steps: optimizer steps.
      base: the shared architecture (vocab, d_model, heads, layers, numerics); its ``d_ff``
        is ignored.
    """

    name: str
    domains: tuple[str, ...]
    d_ff: int
    steps: int
    base: LlamaConfig

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"ExpertSpec.name={self.name!r} must be a non-empty string")
        if isinstance(self.domains, str) or not all(isinstance(d, str) for d in self.domains):
            raise ValueError(f"ExpertSpec.domains={self.domains!r} must be a tuple of names")
        object.__setattr__(self, "domains", tuple(self.domains))
        _positive_int(f"ExpertSpec({self.name}).d_ff", self.d_ff)
        _positive_int(f"ExpertSpec({self.name}).steps", self.steps)
        if not isinstance(self.base, LlamaConfig):
            raise ValueError(f"ExpertSpec.base must be a LlamaConfig, got {type(self.base)}")

    @property
    def config(self) -> LlamaConfig:
        return dataclasses.replace(self.base, d_ff=self.d_ff)


# -- compute budget --------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def non_embedding_params(config: LlamaConfig) -> int:
    """Exact parameter count without the embedding and the head, from shapes only."""
    params = StagedLlama(config, n_stages=1).abstract_params()
    io_rest = {k: v for k, v in params["io"].items() if k not in ("embed", "head")}
    return sum(math.prod(x.shape) for x in jax.tree.leaves((params["body"], io_rest)))


def expert_compute(spec: ExpertSpec, tokens_per_step: int) -> int:
    """Training FLOPs ``6 * N_nonemb * tokens_per_step * steps`` (an exact integer)."""
    return 6 * non_embedding_params(spec.config) * tokens_per_step * spec.steps


def ensemble_budget(specs: Sequence[ExpertSpec]) -> int:
    """``sum_i N_i * T_i`` (parameter-steps): FLOPs / (6 * tokens_per_step)."""
    return sum(non_embedding_params(s.config) * s.steps for s in specs)


def budget_table(ensembles: dict[str, Sequence[ExpertSpec]], tokens_per_step: int = 1) -> str:
    """A printable table: every expert's size and steps, and each ensemble's budget."""
    ref = None
    lines = [f"{'ensemble':12s} {'expert':24s} {'d_ff':>6s} {'N_nonemb':>10s} {'steps':>7s}"
             f" {'sum N*T':>14s} {'FLOPs':>10s} {'vs first':>9s}"]
    for name, specs in ensembles.items():
        for s in specs:
            lines.append(f"{name:12s} {s.name:24s} {s.d_ff:6d} "
                         f"{non_embedding_params(s.config):10,d} {s.steps:7d}")
        budget = ensemble_budget(specs)
        ref = budget if ref is None else ref
        flops = 6 * budget * tokens_per_step
        lines.append(f"{name:12s} {'= total':24s} {'':6s} {'':10s} {'':7s} {budget:14,d} "
                     f"{flops:10.3e} {budget / ref - 1:+9.3%}")
    return "\n".join(lines)


def check_budget(ensembles: dict[str, Sequence[ExpertSpec]], *, tokens_per_step: int = 1,
                 rtol: float = 0.0) -> str:
    """Checks that every ensemble has the same ``sum N_i T_i``; returns :func:`budget_table`.

    Raises:
      ValueError: budgets differ by more than ``rtol`` (relative to the first ensemble); the
        message names the ensembles, their budgets and how far off they are.
    """
    if not ensembles:
        raise ValueError("ensembles must hold at least one named list of ExpertSpec")
    table = budget_table(ensembles, tokens_per_step)
    budgets = {name: ensemble_budget(specs) for name, specs in ensembles.items()}
    first, ref = next(iter(budgets.items()))
    off = [f"{name!r} = {b:,d} ({b / ref - 1:+.4%}, {b - ref:+,d})"
           for name, b in budgets.items() if abs(b - ref) > rtol * ref]
    if off:
        raise ValueError(f"compute budgets differ (sum N*T, rtol={rtol}): {first!r} = {ref:,d}, "
                         f"but {'; '.join(off)}\n{table}")
    return table


def solve_matching_steps(specs: Sequence[ExpertSpec], budget: int, *,
                         vary: Sequence[str] | None = None) -> list[ExpertSpec]:
    """Gives the experts in ``vary`` (default all) one common step count matching ``budget``.

    Raises:
      ValueError: no positive integer step count matches ``budget = sum N_i T_i`` exactly; the
        message gives the two nearest step counts and how far off they are.
    """
    names = [s.name for s in specs]
    vary = tuple(names if vary is None else vary)
    for name in vary:
        if name not in names:
            raise ValueError(f"vary: unknown expert {name!r}; available: {', '.join(names)}")
    fixed = sum(non_embedding_params(s.config) * s.steps for s in specs if s.name not in vary)
    per_step = sum(non_embedding_params(s.config) for s in specs if s.name in vary)
    steps, rest = divmod(budget - fixed, per_step) if per_step else (0, 1)
    if rest or steps < 1:
        exact = (budget - fixed) / max(per_step, 1)
        near = ", ".join(f"{t} steps is {(fixed + t * per_step) / budget - 1:+.4%}"
                         for t in (math.floor(exact), math.ceil(exact)) if t >= 1)
        raise ValueError(f"budget cannot be matched: experts {vary} would need {exact:.3f} "
                         f"steps each to reach sum N*T = {budget:,d}; {near or 'none fit'}")
    return [dataclasses.replace(s, steps=steps) if s.name in vary else s for s in specs]


def dense_steps(config: LlamaConfig, flops: int, *, tokens_per_step: int,
                rtol: float = 0.01) -> int:
    """Steps for one dense model of ``config`` that spend ``flops`` (e.g. an ensemble's).

    The nearest integer; raises if it misses ``flops`` by more than ``rtol``.
    """
    exact = flops / (6 * non_embedding_params(config) * tokens_per_step)
    steps = max(round(exact), 1)
    if abs(steps / exact - 1) > rtol:
        raise ValueError(f"a dense model needs {exact:.2f} steps to match {flops:.4g} FLOPs; "
                         f"{steps} is off by {steps / exact - 1:+.2%} > rtol={rtol}")
    return steps


def dense_reference(base: LlamaConfig, *, d_ff: int, domains: Sequence[str],
                    ensemble: Sequence[ExpertSpec], name: str = "dense") -> ExpertSpec:
    """One dense model on ``domains`` with the ensemble's compute at the same batch size."""
    spec = ExpertSpec(name, tuple(domains), d_ff, 1, base)
    steps = dense_steps(spec.config, 6 * ensemble_budget(ensemble), tokens_per_step=1)
    return dataclasses.replace(spec, steps=steps)


# -- HDEE's three ensembles ------------------------------------------------------------------


def _check_groups(groups) -> list[tuple[tuple[str, ...], str]]:
    if isinstance(groups, str) or not isinstance(groups, Sequence) or not groups:
        raise ValueError("groups must be a non-empty list of (domains, difficulty) pairs")
    out, seen = [], set()
    for i, group in enumerate(groups):
        if not isinstance(group, Sequence) or len(group) != 2:
            raise ValueError(f"groups[{i}]={group!r} must be a (domains, difficulty) pair")
        domains, difficulty = group
        domains = (domains,) if isinstance(domains, str) else tuple(domains)
        if not domains or not all(isinstance(d, str) and d for d in domains):
            raise ValueError(f"groups[{i}].domains={domains!r} must be non-empty domain names")
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"groups[{i}].difficulty={difficulty!r} is not allowed; "
                             f"allowed: {', '.join(DIFFICULTIES)}")
        if seen & set(domains):
            raise ValueError(f"groups[{i}] repeats domain(s) {sorted(seen & set(domains))}")
        seen |= set(domains)
        out.append((domains, difficulty))
    return out


def _three(field: str, values) -> tuple[int, int, int]:
    if not isinstance(values, Sequence) or len(values) != 3:
        raise ValueError(f"{field}={values!r} must be three values (easy, moderate, hard)")
    return tuple(_positive_int(f"{field}[{i}]", v) for i, v in enumerate(values))


def _specs(base, groups, d_ff_of, steps_of) -> list[ExpertSpec]:
    return [ExpertSpec("+".join(domains), domains, d_ff_of[diff], steps_of[diff], base)
            for domains, diff in _check_groups(groups)]


def homogeneous(base: LlamaConfig, groups, *, d_ff: int, steps: int) -> list[ExpertSpec]:
    """``M_Ho-I_Ho``: one expert per group, all of width ``d_ff`` and ``steps`` steps."""
    d_ff, steps = _positive_int("d_ff", d_ff), _positive_int("steps", steps)
    return _specs(base, groups, dict.fromkeys(DIFFICULTIES, d_ff), dict.fromkeys(DIFFICULTIES,
                                                                                 steps))


def _require_match(specs, reference, hint: str) -> list[ExpertSpec]:
    got, want = ensemble_budget(specs), ensemble_budget(reference)
    if got != want:
        raise ValueError(f"budget cannot be matched: sum N*T = {got:,d} vs {want:,d} for the "
                         f"homogeneous ensemble ({got / want - 1:+.3%}); {hint}")
    return specs


def size_heterogeneous(base: LlamaConfig, groups, *, d_ff: Sequence[int],
                       steps: int) -> list[ExpertSpec]:
    """``M_He-I_Ho``: widths ``d_ff = (small, medium, large)`` for easy/moderate/hard groups.

    Raises:
      ValueError: the budget differs from ``homogeneous(d_ff=medium)``: choose
        ``d_ff_small + d_ff_large = 2 * d_ff_medium`` and as many easy as hard groups.
    """
    small, medium, large = _three("d_ff", d_ff)
    specs = _specs(base, groups, dict(zip(DIFFICULTIES, (small, medium, large), strict=True)),
                   dict.fromkeys(DIFFICULTIES, _positive_int("steps", steps)))
    hint = (f"d_ff_small + d_ff_large = {small + large}, 2 * d_ff_medium = {2 * medium}; "
            "choose d_ff_small + d_ff_large = 2 * d_ff_medium and as many easy as hard groups")
    return _require_match(specs, homogeneous(base, groups, d_ff=medium, steps=steps), hint)


def step_heterogeneous(base: LlamaConfig, groups, *, d_ff: int,
                       steps: Sequence[int]) -> list[ExpertSpec]:
    """``M_Ho-I_He``: steps ``(T - delta, T, T + delta)`` for easy/moderate/hard groups.

    Raises:
      ValueError: the budget differs from ``homogeneous(steps=T)``: choose
        ``steps_easy + steps_hard = 2 * steps_moderate`` and as many easy as hard groups.
    """
    lo, mid, hi = _three("steps", steps)
    specs = _specs(base, groups, dict.fromkeys(DIFFICULTIES, _positive_int("d_ff", d_ff)),
                   dict(zip(DIFFICULTIES, (lo, mid, hi), strict=True)))
    hint = (f"steps_easy + steps_hard = {lo + hi}, 2 * steps_moderate = {2 * mid}; choose "
            "steps_easy + steps_hard = 2 * steps_moderate and as many easy as hard groups")
    return _require_match(specs, homogeneous(base, groups, d_ff=d_ff, steps=mid), hint)


def hdee_ensembles(base: LlamaConfig, groups, *, d_ff: Sequence[int],
                   steps: Sequence[int]) -> dict[str, list[ExpertSpec]]:
    """HDEE's three compute-matched ensembles, keyed by :data:`ENSEMBLE_NAMES`."""
    d_ff, steps = _three("d_ff", d_ff), _three("steps", steps)
    ensembles = {
        "M_Ho-I_Ho": homogeneous(base, groups, d_ff=d_ff[1], steps=steps[1]),
        "M_He-I_Ho": size_heterogeneous(base, groups, d_ff=d_ff, steps=steps[1]),
        "M_Ho-I_He": step_heterogeneous(base, groups, d_ff=d_ff[1], steps=steps),
    }
    check_budget(ensembles)
    return ensembles


# -- d_ff padding ----------------------------------------------------------------------------


def _mlp_axis(path) -> int | None:
    """Axis of the SwiGLU hidden width for a parameter-shaped leaf, else ``None``."""
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if keys[-3:] in (["mlp", "w_gate", "kernel"], ["mlp", "w_up", "kernel"]):
        return -1
    return -2 if keys[-3:] == ["mlp", "w_down", "kernel"] else None


def params_d_ff(params: PyTree) -> int:
    """The (padded) SwiGLU width of a parameter tree."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if _mlp_axis(path) == -1:
            return leaf.shape[-1]
    raise ValueError("params hold no SwiGLU weights (no mlp/w_gate/kernel leaf)")


def pad_d_ff(params: PyTree, config: LlamaConfig, d_ff_target: int) -> PyTree:
    """Zero-pads every SwiGLU gate/up column and down row from ``config.d_ff`` to the target.

    Works on any tree with parameter-shaped subtrees (params, gradients, Adam moments), with
    any leading axes.
    """
    width = params_d_ff(params)
    if width != config.hidden_dim:
        raise ValueError(f"params have d_ff={width} but config.d_ff={config.hidden_dim}")
    if not isinstance(d_ff_target, int) or d_ff_target < width:
        raise ValueError(f"d_ff_target={d_ff_target!r} must be an integer >= d_ff={width}")

    def pad(path, leaf):
        axis = _mlp_axis(path)
        if axis is None:
            return leaf
        widths = [(0, 0)] * leaf.ndim
        widths[leaf.ndim + axis] = (0, d_ff_target - width)
        return jnp.pad(leaf, widths)

    return jax.tree_util.tree_map_with_path(pad, params)


def unpad_d_ff(params: PyTree, d_ff: int) -> PyTree:
    """Inverse of :func:`pad_d_ff`: keeps the first ``d_ff`` hidden units."""
    def cut(path, leaf):
        axis = _mlp_axis(path)
        return leaf if axis is None else jax.lax.slice_in_dim(leaf, 0, d_ff, axis=leaf.ndim + axis)

    return jax.tree_util.tree_map_with_path(cut, params)


def _leaf_mask(leaf, axis: int, d_ff) -> jax.Array:
    shape = [1] * leaf.ndim
    shape[leaf.ndim + axis] = leaf.shape[axis]
    return (jnp.arange(leaf.shape[axis]) < d_ff).reshape(shape)


def d_ff_mask(tree: PyTree, d_ff) -> PyTree:
    """Boolean masks (broadcastable, same rank) that are true on the first ``d_ff`` units.

    Non-SwiGLU leaves get a scalar ``True``. ``d_ff`` may be traced (one per expert in a vmap).
    """
    def mask(path, leaf):
        axis = _mlp_axis(path)
        return jnp.ones((), bool) if axis is None else _leaf_mask(leaf, axis, d_ff)

    return jax.tree_util.tree_map_with_path(mask, tree)


def apply_d_ff_mask(tree: PyTree, d_ff) -> PyTree:
    """Zeros the padded hidden units (``>= d_ff``) of every SwiGLU leaf of ``tree``.

    Apply it to gradients and updates every step: padded entries then stay exactly zero.
    """
    def zero(path, leaf):
        axis = _mlp_axis(path)
        if axis is None:
            return leaf
        return jnp.where(_leaf_mask(leaf, axis, d_ff), leaf, jnp.zeros_like(leaf))

    return jax.tree_util.tree_map_with_path(zero, tree)


# -- groups ----------------------------------------------------------------------------------


def shape_signature(config: LlamaConfig) -> tuple:
    """What must match for experts to be stacked without padding."""
    return (config.vocab_size, config.d_model, config.n_heads, config.n_layers,
            config.hidden_dim, config.dtype)


@dataclasses.dataclass(frozen=True)
class ExpertGroup:
    """Experts trained together in one vmapped run.

    Attributes:
      config: the shared (padded) architecture; its ``d_ff`` is the widest expert's.
      specs: the experts, in input order.
    """

    config: LlamaConfig
    specs: tuple[ExpertSpec, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    @property
    def padded_fraction(self) -> float:
        """Share of the group's SwiGLU units that are padding (wasted FLOPs)."""
        return 1 - sum(s.d_ff for s in self.specs) / (len(self.specs) * self.config.hidden_dim)


def group_by_shape(specs: Sequence[ExpertSpec], *, max_pad_ratio: float = 1.0
                   ) -> list[ExpertGroup]:
    """Splits experts into groups that one vmapped step can train.

    Experts whose architectures differ only in ``d_ff`` join one group, padded to its widest
    member, while ``widest / narrowest <= max_pad_ratio``; ``1.0`` groups by exact shape.
    Groups come in order of their first expert.
    """
    if not specs:
        raise ValueError("specs must hold at least one ExpertSpec")
    if not isinstance(max_pad_ratio, int | float) or max_pad_ratio < 1:
        raise ValueError(f"max_pad_ratio={max_pad_ratio!r} must be a number >= 1")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"expert names must be unique, got {names}")
    families: dict[LlamaConfig, list[ExpertSpec]] = {}
    for s in specs:
        families.setdefault(dataclasses.replace(s.base, d_ff=0), []).append(s)
    groups = []
    for members in families.values():
        start = None
        for width in sorted({s.d_ff for s in members}):
            if start is None or width > max_pad_ratio * start:
                start = width
                groups.append([])
            groups[-1].extend(s for s in members if s.d_ff == width)
    order = {n: i for i, n in enumerate(names)}
    out = []
    for g in groups:
        g = sorted(g, key=lambda s: order[s.name])
        out.append(ExpertGroup(dataclasses.replace(g[0].base, d_ff=max(s.d_ff for s in g)),
                               tuple(g)))
    return sorted(out, key=lambda g: order[g.specs[0].name])
