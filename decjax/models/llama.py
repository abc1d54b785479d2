"""LLaMA-style decoder in Flax NNX, as in the CheckFree reference architecture.

Pre-norm RMSNorm (eps 1e-6), rotary position embeddings (theta 1e4, rotate-half),
SwiGLU feed-forward (hidden width 4*d by default), no biases, no grouped-query attention,
untied embedding and output head, every weight drawn from N(0, 0.02), embedding row of
the pad token zeroed.

:class:`Llama` is the plain monolithic model. Training in decjax runs on the staged
layout built from these same modules (:mod:`decjax.models.staged`).
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of the decoder.

    Attributes:
      vocab_size: number of token ids.
      d_model: residual stream width.
      n_heads: attention heads; must divide ``d_model``.
      n_layers: transformer blocks in total.
      d_ff: SwiGLU hidden width; ``0`` means ``4 * d_model`` (the reference choice).
      rope_theta: rotary embedding base.
      norm_eps: RMSNorm epsilon.
      init_std: standard deviation of every weight at initialisation.
      pad_id: token whose embedding row starts at zero, or ``-1`` for none.
      dtype: compute dtype of activations ("float32" or "bfloat16"); weights stay float32.
    """

    vocab_size: int
    d_model: int
    n_heads: int
    n_layers: int
    d_ff: int = 0
    rope_theta: float = 1e4
    norm_eps: float = 1e-6
    init_std: float = 0.02
    pad_id: int = 0
    dtype: str = "float32"

    @property
    def hidden_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)


def _dense(cfg: LlamaConfig, d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=False,
        dtype=cfg.compute_dtype,
        kernel_init=nnx.initializers.normal(cfg.init_std),
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a learned gain, computed in float32."""

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].reshape((1,) * (x.ndim - 1) + (-1,))
        return (normed * scale).astype(x.dtype)


def rotary_embedding(x_BTHK, theta: float):
    """Rotate-half RoPE over the last axis, positions ``0..T-1``."""
    seq_len, head_dim = x_BTHK.shape[1], x_BTHK.shape[-1]
    inv_freq = theta ** -(jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles_TK = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    angles_TK = jnp.concatenate([angles_TK, angles_TK], axis=-1)
    cos, sin = jnp.cos(angles_TK)[None, :, None, :], jnp.sin(angles_TK)[None, :, None, :]
    x32 = x_BTHK.astype(jnp.float32)
    half = head_dim // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x_BTHK.dtype)


class Attention(nnx.Module):
    """Causal multi-head self-attention with rotary position embeddings."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        d = cfg.d_model
        self.wq, self.wk = _dense(cfg, d, d, rngs), _dense(cfg, d, d, rngs)
        self.wv, self.wo = _dense(cfg, d, d, rngs), _dense(cfg, d, d, rngs)
        self.n_heads, self.head_dim, self.theta = cfg.n_heads, cfg.head_dim, cfg.rope_theta

    def __call__(self, x_BTD):
        batch, seq_len, _ = x_BTD.shape
        heads = lambda y: y.reshape(batch, seq_len, self.n_heads, self.head_dim)
        q_BTHK = rotary_embedding(heads(self.wq(x_BTD)), self.theta)
        k_BTHK = rotary_embedding(heads(self.wk(x_BTD)), self.theta)
        v_BTHK = heads(self.wv(x_BTD))
        out_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BTHK, v_BTHK, is_causal=True)
        return self.wo(out_BTHK.reshape(batch, seq_len, -1))


class SwiGLU(nnx.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.w_gate = _dense(cfg, cfg.d_model, cfg.hidden_dim, rngs)
        self.w_up = _dense(cfg, cfg.d_model, cfg.hidden_dim, rngs)
        self.w_down = _dense(cfg, cfg.hidden_dim, cfg.d_model, rngs)

    def __call__(self, x):
        return self.w_down(jax.nn.silu(self.w_gate(x)) * self.w_up(x))


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg, rngs)

    def __call__(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Embed(nnx.Module):
    """Token embedding with the pad row zeroed at initialisation (as the reference does)."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        table = nnx.initializers.normal(cfg.init_std)(
            rngs.params(), (cfg.vocab_size, cfg.d_model), jnp.float32
        )
        if cfg.pad_id >= 0:
            table = table.at[cfg.pad_id].set(0.0)
        self.embedding = nnx.Param(table)
        self.dtype = cfg.compute_dtype

    def __call__(self, tokens_BT):
        return jnp.take(self.embedding[...], tokens_BT, axis=0).astype(self.dtype)


class Llama(nnx.Module):
    """The plain monolithic decoder: embedding, ``n_layers`` blocks, final norm, head.

    Logits are float32 whatever the compute dtype.
    """

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.embed = Embed(cfg, rngs)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = _dense(cfg, cfg.d_model, cfg.vocab_size, rngs)

    def __call__(self, tokens_BT):
        x = self.embed(tokens_BT)
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x)).astype(jnp.float32)


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), matmuls only.

    Counts ``2 * params`` per token for every matmul weight (embedding lookup excluded)
    plus causal attention scores and values (``2 * 2 * T * d / 2`` per layer, forward).
    """
    d, f, n = cfg.d_model, cfg.hidden_dim, cfg.n_layers
    matmul_params = n * (4 * d * d + 3 * d * f) + d * cfg.vocab_size
    attention = n * 2 * seq_len * d  # QK^T and AV, halved for the causal mask
    return 3.0 * (2.0 * matmul_params + attention)
