"""Where a non-sync NoLoCo update spends its time: AdamW with extra state passed through.

Times the optimizer update + ``apply_updates`` alone (jitted, state donated or not) for plain
AdamW, AdamW whose state also carries a counter, one or two float32 copies of the parameters
passed through unchanged (what NoLoCo's anchor and momentum cost when stored leaf by leaf),
and ``noloco(adamw)`` with the static ``sync=False`` hint and with its ``lax.cond``. Prints
seconds per step, the ratio to plain AdamW, and counts from the compiled program.

    python bench/noloco_profile.py --size=small --update_steps=50 --rounds=7
"""

import functools
import re
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from absl import app, flags
from flax import nnx
from noloco_step import adamw, model_config

from decjax.models import Llama
from decjax.optim import noloco

FLAGS = flags.FLAGS  # --size, --update_steps (per round) and --rounds, as in noloco_step.py


class CarryState(NamedTuple):
    inner: optax.OptState
    carried: tuple
    count: jax.Array


def carrying(inner: optax.GradientTransformation, n_copies: int):
    """``inner`` with ``n_copies`` float32 copies of the parameters carried unchanged."""
    def init(params):
        copies = tuple(jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), params)
                       for _ in range(n_copies))
        return CarryState(inner.init(params), copies, jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        updates, inner_state = inner.update(updates, state.inner, params)
        return updates, CarryState(inner_state, state.carried, state.count + 1)

    return optax.GradientTransformation(init, update)


def optimizers() -> dict[str, optax.GradientTransformation]:
    hinted = noloco(adamw(), sync_every=10**6, axis_name=None)
    return {
        "plain": adamw(),
        "counter": carrying(adamw(), 0),
        "1 copy": carrying(adamw(), 1),
        "2 copies": carrying(adamw(), 2),
        "noloco sync=False": optax.GradientTransformationExtraArgs(
            hinted.init, functools.partial(hinted.update, sync=False)),
        "noloco cond": noloco(adamw(), sync_every=10**6, axis_name=None),
    }


def update_step(tx):
    def step(state, grads):
        params, opt_state = state
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
    return step


def program_stats(compiled) -> str:
    entry = compiled.as_text().rsplit("ENTRY", 1)[-1]
    fusions = len(re.findall(r"= \S+ fusion\(", entry))
    copies = len(re.findall(r"= \S+ copy\(", entry))
    temp_mb = compiled.memory_analysis().temp_size_in_bytes / 1e6
    return f"fusions {fusions}, copies {copies}, temp {temp_mb:.1f} MB"


def seconds_per_step(step, state, grads) -> float:
    for _ in range(3):
        state = step(state, grads)
    times = []
    for _ in range(FLAGS.rounds):
        start = time.perf_counter()
        for _ in range(FLAGS.update_steps):
            state = step(state, grads)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - start) / FLAGS.update_steps)
    return sorted(times)[len(times) // 2]


def main(argv):
    del argv
    params = nnx.to_pure_dict(nnx.state(Llama(model_config(FLAGS.size), nnx.Rngs(0))))
    grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)
    n_leaves = len(jax.tree.leaves(params))
    print(f"{FLAGS.size}: {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.1f}M params, "
          f"{n_leaves} leaves, {jax.devices()[0].device_kind}")
    for donate in (True, False):
        plain = None
        for name, tx in optimizers().items():
            step = jax.jit(update_step(tx), donate_argnums=0 if donate else ())
            state = jax.tree.map(jnp.copy, (params, tx.init(params)))
            stats = program_stats(step.lower(state, grads).compile())
            seconds = seconds_per_step(step, state, grads)
            plain = plain or seconds
            print(f"donate={donate!s:<5} {name:<18} {seconds * 1e6:9.1f} us  "
                  f"ratio {seconds / plain:5.3f}  {stats}", flush=True)


if __name__ == "__main__":
    app.run(main)
