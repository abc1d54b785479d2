"""Overhead of a non-sync NoLoCo step over the plain inner optimizer (AdamW).

Between outer steps ``noloco(adamw)`` should cost what ``adamw`` costs: the outer step sits
under ``lax.cond`` and only runs every ``sync_every`` updates. This benchmark times, side by
side in one process with interleaved rounds, plain AdamW against NoLoCo(AdamW) in:

* ``train``: a full Flax NNX train step (forward, backward, update) of a decjax ``Llama``;
* ``train R=4``: the same step for ``R`` replicas under ``jax.vmap(..., axis_name="replica")``
  (plain: independent AdamW replicas, no communication);
* ``update`` / ``update R=4``: the optimizer update and ``apply_updates`` alone, on the
  same parameter tree; the most stringent, as no model compute hides the overhead.

``sync_every`` is set past the last timed step, and the benchmark checks that no outer step
ran. Goal: ``ratio = noloco / plain`` (seconds per step) <= 1.03.

    python bench/noloco_step.py                     # preset "tiny", CPU
    python bench/noloco_step.py --size=small --variants=update   # the optimizer alone
    python bench/noloco_step.py --record            # append to bench/results/noloco_step.jsonl
"""

import functools
import json
import pathlib
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from plain import VOCAB, plain_train_step

from decjax.models import Llama, LlamaConfig, preset
from decjax.optim import noloco, stack_replicas

FLAGS = flags.FLAGS
flags.DEFINE_string("size", "tiny", "Model preset (decjax.models.PRESETS).")
flags.DEFINE_integer("batch", 8, "Sequences per step and replica.")
flags.DEFINE_integer("seq_len", 0, "Tokens per sequence; 0 takes the preset's.")
flags.DEFINE_integer("replicas", 4, "Replicas of the vmapped variants.")
flags.DEFINE_integer("steps", 3, "Timed train steps per round.")
flags.DEFINE_integer("update_steps", 30, "Timed optimizer-only steps per round.")
flags.DEFINE_integer("rounds", 9, "Interleaved timing rounds (median is reported).")
flags.DEFINE_multi_enum("variants", ["train", "update"], ["train", "update"],
                        "What to time: the full train step, the optimizer update alone.")
flags.DEFINE_bool("sync_hint", False, "Pass sync=False to every NoLoCo update (no lax.cond).")
flags.DEFINE_bool("record", False, "Append the results to bench/results/noloco_step.jsonl.")

GOAL = 1.03
WARMUP_STEPS = 2


def model_config(size: str) -> LlamaConfig:
    spec = preset(size)
    return LlamaConfig(vocab_size=VOCAB, d_model=spec["d_model"], n_heads=spec["n_heads"],
                       n_layers=spec["n_layers"], d_ff=spec["d_ff"])


def adamw() -> optax.GradientTransformation:
    return optax.adamw(3e-4, weight_decay=0.1)


def noloco_adamw(sync_every: int, axis_name: str | None) -> optax.GradientTransformation:
    """``noloco(adamw)``; with ``--sync_hint`` every update is told statically it does not sync."""
    tx = noloco(adamw(), sync_every=sync_every, axis_name=axis_name)
    if not FLAGS.sync_hint:
        return tx
    return optax.GradientTransformationExtraArgs(tx.init, functools.partial(tx.update, sync=False))


def update_step(tx: optax.GradientTransformation):
    """The optimizer alone: one update from fixed gradients, applied to the parameters."""
    def step(state, grads):
        params, opt_state = state
        updates, opt_state = tx.update(grads, opt_state, params)
        # Only the new state leaves the step: returning ``updates`` too would make the plain
        # step write them out as well, hiding the cost of materializing them.
        return (optax.apply_updates(params, updates), opt_state), None
    return step


def fresh(tree):
    """A copy, so that each timed step owns (and may donate) its own buffers."""
    return jax.tree.map(jnp.copy, tree)


def compiled(step, n_replicas: int):
    """``step`` jitted with its state donated, vmapped over the replica axis when ``R > 1``."""
    if n_replicas > 1:
        step = jax.vmap(step, axis_name="replica")
    return jax.jit(step, donate_argnums=0)


def initial_state(params, tx, n_replicas: int):
    if n_replicas == 1:
        return fresh((params, tx.init(params)))
    stacked = stack_replicas(params, n_replicas)
    return fresh((stacked, jax.vmap(tx.init)(stacked)))


def time_steps(step, state, arg, n_steps: int) -> tuple[float, float, object]:
    """Seconds and minor page faults per step over ``n_steps`` dispatched back to back.

    Page faults show memory the step maps afresh on every call (on CPU, XLA's temporary
    buffers), a cost that the arithmetic alone does not explain.
    """
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(n_steps):
        state, out = step(state, arg)
    jax.block_until_ready((state, out))
    seconds = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return seconds / n_steps, faults / n_steps, state


def build_pairs(cfg: LlamaConfig, params, sync_every: int) -> dict:
    """variant -> {"plain"|"noloco": (jitted step, initial state), "arg": ..., "steps": int}."""
    seq_len = FLAGS.seq_len or preset(FLAGS.size)["seq_len"]
    n = FLAGS.replicas
    key_rows, key_grads = jax.random.split(jax.random.key(1))
    rows = jax.random.randint(key_rows, (n, FLAGS.batch, seq_len + 1), 2, VOCAB)
    leaves, treedef = jax.tree.flatten(params)
    grad_keys = jax.random.split(key_grads, len(leaves))
    grads = treedef.unflatten([1e-3 * jax.random.normal(k, (n, *x.shape), x.dtype)
                               for k, x in zip(grad_keys, leaves, strict=True)])
    optimizers = {
        "plain": lambda axis_name: adamw(),
        "noloco": lambda axis_name: noloco_adamw(sync_every, axis_name),
    }
    kinds = [("train", lambda tx: plain_train_step(cfg, tx), rows, FLAGS.steps),
             ("update", update_step, grads, FLAGS.update_steps)]
    pairs = {}
    for kind, make_step, batches, n_steps in kinds:
        if kind not in FLAGS.variants:
            continue
        for r in sorted({1, n}):
            pair = {"arg": jax.tree.map(lambda x: x[0], batches) if r == 1 else batches,
                    "steps": n_steps}
            for name, make_tx in optimizers.items():
                tx = make_tx(None if r == 1 else "replica")
                pair[name] = (compiled(make_step(tx), r), initial_state(params, tx, r))
            pairs[kind if r == 1 else f"{kind} R={r}"] = pair
    return pairs


def check_no_sync(state, sync_every: int, total_steps: int) -> None:
    """The NoLoCo steps run were all inner steps: no outer round ran, the count kept rising."""
    outer_state = state[1]
    assert int(jnp.max(outer_state.round)) == 0, "an outer step ran during timing"
    count = int(jnp.min(outer_state.count))
    assert count == total_steps < sync_every, (count, total_steps, sync_every)


def run_interleaved(pairs: dict) -> tuple[dict, dict]:
    """Per (variant, optimizer): per-round seconds per step, and the final state."""
    states, timings = {}, {}
    for variant, pair in pairs.items():  # compile + warm up
        for name in ("plain", "noloco"):
            step, state = pair[name]
            *_, states[variant, name] = time_steps(step, state, pair["arg"], WARMUP_STEPS)
            timings[variant, name] = []
    for round_index in range(FLAGS.rounds):
        # Alternate which of a pair goes first, so neither always follows the other.
        order = ("plain", "noloco") if round_index % 2 == 0 else ("noloco", "plain")
        for variant, pair in pairs.items():
            for name in order:
                seconds, faults, states[variant, name] = time_steps(
                    pair[name][0], states[variant, name], pair["arg"], pair["steps"])
                timings[variant, name].append((seconds, faults))
    return timings, states


def main(argv):
    del argv
    cfg = model_config(FLAGS.size)
    params = nnx.to_pure_dict(nnx.state(Llama(cfg, nnx.Rngs(0))))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    most_steps = WARMUP_STEPS + FLAGS.rounds * max(FLAGS.steps, FLAGS.update_steps)
    sync_every = most_steps + 1  # no outer step within the run
    pairs = build_pairs(cfg, params, sync_every)
    timings, states = run_interleaved(pairs)
    for variant, pair in pairs.items():
        check_no_sync(states[variant, "noloco"], sync_every,
                      WARMUP_STEPS + FLAGS.rounds * pair["steps"])

    seq_len = FLAGS.seq_len or preset(FLAGS.size)["seq_len"]
    device = jax.devices()[0]
    print(f"device: {device.device_kind} x{jax.device_count()}, jax {jax.__version__}, "
          f"size={FLAGS.size} ({n_params / 1e6:.2f}M params), batch={FLAGS.batch}x{seq_len} "
          f"tokens per replica, float32, sync_every={sync_every} (no outer step runs)"
          f"{', sync=False passed to every update' if FLAGS.sync_hint else ''}")
    print(f"{'variant':<12}{'plain steps/s':>15}{'noloco steps/s':>16}{'ratio':>8}"
          f"{'per-round ratios':>18}{'page faults/step':>20}")
    records = []
    for variant in pairs:
        plain_s, plain_faults = zip(*timings[variant, "plain"], strict=True)
        loco_s, loco_faults = zip(*timings[variant, "noloco"], strict=True)
        plain, loco = statistics.median(plain_s), statistics.median(loco_s)
        per_round = [b / a for a, b in zip(plain_s, loco_s, strict=True)]
        faults = (statistics.median(plain_faults), statistics.median(loco_faults))
        print(f"{variant:<12}{1 / plain:>15.2f}{1 / loco:>16.2f}{loco / plain:>8.3f}"
              f"{f'{min(per_round):.2f}-{max(per_round):.2f}':>18}"
              f"{f'{faults[0]:.0f} / {faults[1]:.0f}':>20}")
        records.append(dict(
            variant=variant, plain_seconds_per_step=plain, noloco_seconds_per_step=loco,
            ratio=loco / plain, per_round_ratios=per_round, plain_page_faults_per_step=faults[0],
            noloco_page_faults_per_step=faults[1], goal=GOAL, jax=jax.__version__,
            device=device.device_kind, size=FLAGS.size, n_params=n_params, batch=FLAGS.batch,
            seq_len=seq_len, replicas=FLAGS.replicas, sync_hint=FLAGS.sync_hint,
            steps=pairs[variant]["steps"],
            rounds=FLAGS.rounds, sync_every=sync_every, dtype="float32",
        ))
    print(f"ratio = noloco / plain seconds per step (median over rounds); goal <= {GOAL}")
    if FLAGS.record:
        out = pathlib.Path(__file__).parent / "results" / "noloco_step.jsonl"
        out.parent.mkdir(exist_ok=True)
        with out.open("a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    np.testing.assert_(all(np.isfinite(r["ratio"]) for r in records))


if __name__ == "__main__":
    app.run(main)
