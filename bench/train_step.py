"""Throughput of the staged, routed train step against a plain monolithic Flax train step.

Both steps train the same model (same initial weights, same batch, AdamW with clipping) and
are timed side by side in one process, interleaved, so the ratio is robust to machine load.

    python bench/train_step.py                      # preset "small", CPU
    python bench/train_step.py --size=tiny --steps=20
    python bench/train_step.py --dtype=bfloat16     # on a GPU: also prints MFU

Output: a table of tokens/s per variant and ``ratio = routed / plain`` (goal >= 0.9), and,
on a GPU with a known peak, model FLOPs utilisation. Results are appended as JSON lines to
``bench/results/train_step.jsonl`` when ``--record`` is given.
"""

import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from plain import VOCAB, plain_train_step

from decjax.models import Llama, LlamaConfig, StagedLlama, flops_per_token, full_route, preset
from decjax.optim import stage_adamw
from decjax.train.step import TrainState, make_train_step

FLAGS = flags.FLAGS
flags.DEFINE_string("size", "small", "Model preset (decjax.models.PRESETS).")
flags.DEFINE_integer("batch", 16, "Sequences per step.")
flags.DEFINE_integer("seq_len", 0, "Tokens per sequence; 0 takes the preset's.")
flags.DEFINE_multi_integer("microbatches", [1, 4], "Microbatch counts for the routed step.")
flags.DEFINE_integer("stages", 0, "Body stages; 0 takes the preset's.")
flags.DEFINE_integer("steps", 10, "Timed steps per round.")
flags.DEFINE_integer("rounds", 3, "Interleaved timing rounds (median is reported).")
flags.DEFINE_string("dtype", "float32", "Compute dtype.")
flags.DEFINE_bool("record", False, "Append the results to bench/results/train_step.jsonl.")

# Dense bf16 peak FLOP/s of GPUs we may be lent; MFU is reported only for these.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}





def time_steps(step, state, args, n_steps: int) -> tuple[float, object]:
    """Seconds per step over ``n_steps`` dispatched back to back."""
    start = time.perf_counter()
    for _ in range(n_steps):
        state, out = step(state, *args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / n_steps, state


def main(argv):
    del argv
    spec = preset(FLAGS.size)
    seq_len = FLAGS.seq_len or spec["seq_len"]
    n_stages = FLAGS.stages or spec["n_stages"]
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        d_model=spec["d_model"],
        n_heads=spec["n_heads"],
        n_layers=spec["n_layers"],
        d_ff=spec["d_ff"],
        dtype=FLAGS.dtype,
    )
    rows = jax.random.randint(jax.random.key(1), (FLAGS.batch, seq_len + 1), 2, VOCAB)
    key = jax.random.key(0)

    plain_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-4, weight_decay=0.0))
    plain_params = nnx.to_pure_dict(nnx.state(Llama(cfg, nnx.Rngs(key))))
    variants = {
        "plain": (
            jax.jit(plain_train_step(cfg, plain_tx), donate_argnums=0),
            (plain_params, plain_tx.init(plain_params)),
            (rows,),
        )
    }
    model = StagedLlama(cfg, n_stages)
    tx = stage_adamw(3e-4)
    for m in FLAGS.microbatches:
        params = model.init(key)
        state = TrainState(jnp.zeros([], jnp.int32), params, tx.init(params))
        route = jnp.asarray(full_route(m, n_stages))
        step = jax.jit(make_train_step(model, tx), donate_argnums=0)
        variants[f"routed M={m}"] = (step, state, (rows, route))

    states, timings = {}, {name: [] for name in variants}
    for name, (step, state, args) in variants.items():  # compile + warm up
        _, states[name] = time_steps(step, state, args, 2)
    for _ in range(FLAGS.rounds):
        for name, (step, _, args) in variants.items():
            seconds, states[name] = time_steps(step, states[name], args, FLAGS.steps)
            timings[name].append(seconds)

    tokens = FLAGS.batch * seq_len
    flops = flops_per_token(cfg, seq_len) * tokens
    device = jax.devices()[0]
    peak = next((v for k, v in PEAK_FLOPS.items() if k in device.device_kind), None)
    base = statistics.median(timings["plain"])
    print(f"device: {device.device_kind} x{jax.device_count()}, size={FLAGS.size}, "
          f"S={n_stages}, batch={FLAGS.batch}x{seq_len} tokens, dtype={FLAGS.dtype}")
    print(f"{'variant':<14}{'s/step':>10}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}{'ratio':>8}")
    records = []
    for name, seconds_list in timings.items():
        seconds = statistics.median(seconds_list)
        mfu = f"{flops / seconds / peak:.1%}" if peak else "n/a"
        print(f"{name:<14}{seconds:>10.4f}{tokens / seconds:>12.0f}"
              f"{flops / seconds / 1e12:>10.3f}{mfu:>8}{base / seconds:>8.3f}")
        records.append(dict(
            variant=name, seconds_per_step=seconds, tokens_per_second=tokens / seconds,
            ratio_vs_plain=base / seconds, device=device.device_kind, size=FLAGS.size,
            batch=FLAGS.batch, seq_len=seq_len, dtype=FLAGS.dtype,
        ))
    if FLAGS.record:
        out = pathlib.Path(__file__).parent / "results" / "train_step.jsonl"
        out.parent.mkdir(exist_ok=True)
        with out.open("a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    np.testing.assert_(all(np.isfinite(statistics.median(t)) for t in timings.values()))


if __name__ == "__main__":
    app.run(main)
