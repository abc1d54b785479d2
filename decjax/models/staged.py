"""The staged layout of the decoder and its routed forward pass.

Parameters are one plain pytree::

    {"io":   {"embed", "final_norm", "head"},         # the reference's stage 0
     "body": <Block params, every leaf [S, L, ...]>}  # body stage s is body[s]

A *route* ``int32[M, P]`` lists, for each microbatch, the body stages it visits in order
(``-1`` is a skip slot). The routed forward scans over hops and gathers the visited stage's
weights by index, so

* the full route ``[0, 1, ..., S-1]`` reproduces the plain sequential model;
* any route of the same shape reuses one compilation (the route is an argument);
* a stage that no microbatch visits receives an exactly zero gradient, because a skip slot
  selects its input (``where`` or ``lax.cond``), so the gathered weights get no cotangent.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from decjax import tree
from decjax.models.llama import Llama, LlamaConfig
from decjax.types import Params

_IO_NAMES = ("embed", "final_norm", "head")


def full_route(n_microbatches: int, n_stages: int) -> np.ndarray:
    """``int32[M, S]``: every microbatch visits every body stage in order."""
    return np.tile(np.arange(n_stages, dtype=np.int32), (n_microbatches, 1))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_staged(config: LlamaConfig, n_stages: int, key: jax.Array) -> Params:
    """Module level so one compilation serves every model of the same shape."""
    state = nnx.state(Llama(config, nnx.Rngs(key)))
    return monolithic_to_staged(nnx.to_pure_dict(state), n_stages)


def monolithic_to_staged(llama_params: dict, n_stages: int) -> Params:
    """Converts a :class:`Llama` pure-dict state into the staged layout."""
    blocks = llama_params["blocks"]
    n_layers = len(blocks)
    if n_layers % n_stages:
        raise ValueError(f"n_layers={n_layers} is not divisible by n_stages={n_stages}")
    stacked = tree.stack([blocks[i] for i in range(n_layers)])
    body = jax.tree.map(lambda a: a.reshape(n_stages, n_layers // n_stages, *a.shape[1:]), stacked)
    io = {name: llama_params[name] for name in _IO_NAMES}
    return {"io": io, "body": body}


def staged_to_monolithic(params: Params) -> dict:
    """Inverse of :func:`monolithic_to_staged`: a pure dict that ``nnx.merge`` accepts."""
    flat = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), params["body"])
    n_layers = jax.tree.leaves(flat)[0].shape[0]
    blocks = {i: tree.index(flat, i) for i in range(n_layers)}
    return {**params["io"], "blocks": blocks}


@dataclasses.dataclass(frozen=True, eq=False)
class StagedLlama:
    """A :class:`Llama` cut into ``n_stages`` body stages, applied as pure functions.

    A skip slot (``-1``) either computes the gathered stage and discards the result with a
    ``where`` (default: fastest when routes rarely skip, as in CheckFree or NoLoCo), or, with
    ``skip_by_branching=True``, takes a ``lax.cond`` branch that costs nothing at run time but
    slows the backward pass (~15% on CPU); use it for routes that skip often (SkipPipe).
    Either way a skipped slot contributes exactly zero gradient.

    Example::

        model = StagedLlama(LlamaConfig(vocab_size=258, d_model=64, n_heads=4, n_layers=4),
                            n_stages=2)
        params = model.init(jax.random.key(0))
        route = full_route(n_microbatches=2, n_stages=2)
        logits_MBTV = model.forward(params, tokens_MBT, route)
    """

    config: LlamaConfig
    n_stages: int
    skip_by_branching: bool = False

    def __post_init__(self):
        if self.n_stages <= 0 or self.config.n_layers % self.n_stages:
            raise ValueError(
                f"model.n_layers={self.config.n_layers} must be divisible by "
                f"model.n_stages={self.n_stages} (a positive divisor)"
            )

    @property
    def layers_per_stage(self) -> int:
        return self.config.n_layers // self.n_stages

    @functools.cached_property
    def _graphdefs(self):
        """Static structure of each module, recovered once from an abstract model."""
        abstract = nnx.eval_shape(lambda: Llama(self.config, nnx.Rngs(0)))
        graphdefs = {name: nnx.graphdef(getattr(abstract, name)) for name in _IO_NAMES}
        return {**graphdefs, "block": nnx.graphdef(abstract.blocks[0])}

    def init(self, key: jax.Array) -> Params:
        """Staged parameters; identical values to ``Llama(config, nnx.Rngs(key))``."""
        return _init_staged(self.config, self.n_stages, key)

    def abstract_params(self) -> Params:
        """Shapes and dtypes of :meth:`init`'s output, without allocating anything."""
        return jax.eval_shape(self.init, jax.random.key(0))

    # -- pieces ------------------------------------------------------------------------------

    def embed(self, io: dict, tokens_BT: jax.Array) -> jax.Array:
        return nnx.merge(self._graphdefs["embed"], io["embed"])(tokens_BT)

    def head(self, io: dict, x_BTD: jax.Array) -> jax.Array:
        """Final norm and output projection; float32 logits."""
        x_BTD = nnx.merge(self._graphdefs["final_norm"], io["final_norm"])(x_BTD)
        return nnx.merge(self._graphdefs["head"], io["head"])(x_BTD).astype(jnp.float32)

    def apply_stage(self, stage_params, x_BTD: jax.Array) -> jax.Array:
        """Runs the ``L`` blocks of one body stage (leaves ``[L, ...]``) in order.

        The layer loop is unrolled: a rolled loop costs ~1.6x on CPU (no fusion across
        layers, stacked residual copies), and stages hold only a few layers.
        """
        block_def = self._graphdefs["block"]

        def layer(x, layer_params):
            return nnx.merge(block_def, layer_params)(x), None

        return jax.lax.scan(layer, x_BTD, stage_params, unroll=True)[0]

    # -- routed forward ------------------------------------------------------------------------

    def hidden(self, params: Params, tokens_BT: jax.Array, route_P: jax.Array) -> jax.Array:
        """Embedding, then the body stages of one route row, in order; skips ``-1`` slots."""
        x = self.embed(params["io"], tokens_BT)
        for hop in range(route_P.shape[0]):  # P is static; unrolled hops fuse better than a scan
            stage = route_P[hop]
            # Clamp so the gather is always in bounds; a skip slot discards its result.
            weights = tree.index(params["body"], jnp.maximum(stage, 0))
            if self.skip_by_branching:
                x = jax.lax.cond(stage >= 0, self.apply_stage, lambda _, y: y, weights, x)
            else:
                x = jnp.where(stage >= 0, self.apply_stage(weights, x), x)
        return x

    def microbatch_logits(self, params: Params, tokens_BT, route_P) -> jax.Array:
        """``float32[B, T, V]`` logits of one microbatch along one route row."""
        return self.head(params["io"], self.hidden(params, tokens_BT, route_P))

    def forward(self, params: Params, tokens_MBT: jax.Array, route_MP: jax.Array) -> jax.Array:
        """Logits ``float32[M, B, T, V]``: microbatch ``m`` follows ``route_MP[m]``."""
        _check_route(tokens_MBT, route_MP, self.n_stages)
        return jax.lax.map(
            lambda xs: self.microbatch_logits(params, *xs), (tokens_MBT, route_MP)
        )

    def loss(self, params: Params, rows_BT1: jax.Array, route_P: jax.Array):
        """Mean next-token cross-entropy of one microbatch of packed rows ``[B, T+1]``.

        Targets equal to the pad id are masked out. Returns ``(loss, n_tokens)``.
        """
        inputs, targets = rows_BT1[:, :-1], rows_BT1[:, 1:]
        logits = self.microbatch_logits(params, inputs, route_P)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        mask = (targets != self.config.pad_id).astype(jnp.float32)
        n_tokens = jnp.sum(mask)
        return jnp.sum(losses * mask) / jnp.maximum(n_tokens, 1.0), n_tokens


def _check_route(tokens_MBT, route_MP, n_stages: int) -> None:
    if tokens_MBT.ndim != 3:
        raise ValueError(f"tokens must be [M, B, T] microbatches, got shape {tokens_MBT.shape}")
    if route_MP.ndim != 2 or route_MP.shape[0] != tokens_MBT.shape[0]:
        raise ValueError(
            f"route must be int32[M, P] with M={tokens_MBT.shape[0]}, got shape {route_MP.shape}"
        )
    if not jnp.issubdtype(route_MP.dtype, jnp.integer):
        raise ValueError(f"route must hold integers, got {route_MP.dtype}")
    if isinstance(route_MP, np.ndarray) and (route_MP.min() < -1 or route_MP.max() >= n_stages):
        raise ValueError(f"route entries must lie in [-1, {n_stages - 1}], got {route_MP}")
