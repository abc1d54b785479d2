"""Pieces the benchmarks share: the plain Flax NNX train step they measure against."""

import jax
import optax
from flax import nnx

from decjax.models import Llama, LlamaConfig

VOCAB = 258  # the byte tokenizer's vocabulary


def plain_train_step(cfg: LlamaConfig, tx: optax.GradientTransformation):
    """The textbook NNX functional step: split once, value_and_grad over the whole batch."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0))))

    def loss_fn(params, rows):
        logits = nnx.merge(graphdef, params)(rows[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:]).mean()

    def step(state, rows):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, rows)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return step
