"""SkipPipe: simulated iteration time, training along skip schedules, omitted-stage inference.

    python experiments/skippipe/run.py                 # the full grid -> results/results.md
    python experiments/skippipe/run.py --grid=quick    # 20 nodes, tiny planner and step counts

Three parts, each writing its table as soon as it is done:

1. **Iteration time (simulated) and planner time (measured).** On the reference instance
   (20 nodes, partition [5, 3, 3, 3, 3, 3]) and an 18-node variant ([3, 3, 3, 3, 3, 3]), at
   25 % and 33 % skip, 30 microbatches: full pipelines, round robin, the planner without
   collision awareness, the planner, and a rotation of planned schedules with fixed stage
   sets (the schedules trained on in part 2). Makespans come from the event simulator.
2. **Training (measured losses, simulated clock).** A small staged Llama (io + 5 body stages
   of one block each, byte vocabulary, Python standard library) trained for the same number of
   iterations along the full route (0 % skip) and along the rotating planned schedules of
   part 1 (25 %, 33 %; at 25 % also planned without adjacent swaps). The clock multiplies
   iterations by the simulated makespan of the schedules on the 20-node reference instance.
3. **Omitted stages.** Every trained model evaluated with 100 %, 75 % and 50 % of its stages.

Finished training runs are reused (``results/runs/<run>/result.json``, keyed by config), so an
interrupted grid resumes where it stopped; ``--variants`` / ``--seeds`` train a subset (e.g. in
parallel processes), and a later run without them reuses those runs and writes the tables.
"""

import json
import pathlib
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from absl import app, flags

from decjax.data import (
    default_cache_dir,
    default_data_config,
    eval_batches,
    load_data,
    train_iterator,
)
from decjax.models import LlamaConfig, StagedLlama
from decjax.optim import stage_adamw
from decjax.skippipe import (
    baseline_makespan,
    eval_with_omitted_stages,
    make_skippipe_train_step,
    makespan,
    plan,
    reference_instance,
    rotating_plans,
    round_robin_schedule,
    validate,
)
from decjax.train import init_state, make_eval_step
from decjax.train.records import replace_results_block, write_atomically

plt.switch_backend("Agg")  # files only
FLAGS = flags.FLAGS
flags.DEFINE_enum("grid", "full", ["full", "quick"], "Which grid to run.")
flags.DEFINE_string("out", str(pathlib.Path(__file__).parent / "results"), "Output folder.")
flags.DEFINE_integer("steps", 0, "Training iterations per run; 0 takes the grid's default.")
flags.DEFINE_list("variants", [], "Train only these variants (ids of VARIANTS); no tables.")
flags.DEFINE_list("seeds", [], "Train only these seeds; no tables.")

SKIPS = (0.25, 1 / 3)
MICROBATCHES = 30
INSTANCES = {"20 nodes (reference)": (5, 3, 3, 3, 3, 3), "18 nodes": (3, 3, 3, 3, 3, 3)}
GRIDS = {
    "full": dict(instances=tuple(INSTANCES), datasets=("pystdlib", "synthetic"), seeds=(0, 1),
                 steps=800, evaluations=4000,
                 budget_s=9.0, rotation_budget_s=3.0, eval_every=50, eval_batches=8),
    "quick": dict(instances=("20 nodes (reference)",), datasets=("pystdlib",), seeds=(0,),
                  steps=6, evaluations=40,
                  budget_s=0.5, rotation_budget_s=0.3, eval_every=3, eval_batches=2),
}
# The proxy that is trained: io (embedding + head) + 5 body stages of one block each.
PROXY = dict(d_model=64, n_heads=4, n_stages=5, d_ff=256, seq_len=64, rows_per_microbatch=2,
             lr=3e-3, warmup=20, eval_batch_size=32, max_bytes_per_domain=400_000)
KEEP = (1.0, 0.75, 0.5)


class Variant(NamedTuple):
    label: str
    skip: float
    max_swaps: int  # adjacent swaps allowed per path (the reference: 2)
    color: str


VARIANTS = {
    "skip0": Variant("0 % (full pipelines)", 0.0, 0, "black"),
    "skip25": Variant("25 % skip", 0.25, 2, "tab:blue"),
    "skip25-noswap": Variant("25 % skip, no swaps", 0.25, 0, "tab:cyan"),
    "skip33": Variant("33 % skip", 1 / 3, 2, "tab:red"),
}
ROTATIONS = [(v.skip, v.max_swaps) for v in VARIANTS.values() if v.skip]


def _pct(skip: float) -> str:
    return f"{round(100 * skip)} %"


# -- part 1: simulated iteration time, measured planner time ----------------------------------


def iteration_times(grid: dict) -> tuple[dict, dict]:
    """Rows per (instance, skip), and the rotating plans of the reference instance per skip."""
    rows, rotations = {}, {}
    reference = grid["instances"][0]  # also gets the rotations that are trained on
    search = dict(max_evaluations=grid["evaluations"], time_budget_s=grid["budget_s"])
    for name in grid["instances"]:
        alloc, place, cost, nbytes = reference_instance(INSTANCES[name])
        n_stages = int(alloc.max()) + 1
        for skip in SKIPS:
            args = dict(n_microbatches=MICROBATCHES, skip_ratio=skip, activation_bytes=nbytes)

            def seconds(schedule, skip=skip, place=place, cost=cost, nbytes=nbytes, n=n_stages,
                        max_swaps=2):
                validate(schedule, n_stages=n, skip_ratio=skip, max_swaps=max_swaps)
                return makespan(schedule, place, cost, activation_bytes=nbytes).seconds

            rr = round_robin_schedule(alloc, MICROBATCHES, skip)
            cell = {"full pipelines": (baseline_makespan(rr, place, cost,
                                                         activation_bytes=nbytes).seconds, None),
                    "round robin (unaware)": (seconds(rr), None)}
            for aware, label in ((False, "SkipPipe without collision awareness"),
                                 (True, "SkipPipe (collision aware)")):
                start = time.perf_counter()
                s = plan(alloc, place, cost, **args, collision_aware=aware, **search)
                cell[label] = (seconds(s), time.perf_counter() - start)
            for max_swaps in [m for k, m in ROTATIONS if k == skip and name == reference]:
                start = time.perf_counter()
                plans = rotating_plans(alloc, place, cost, **args, count=n_stages,
                                       max_swaps=max_swaps, max_evaluations=grid["evaluations"],
                                       time_budget_s=grid["rotation_budget_s"])
                wall = (time.perf_counter() - start) / len(plans)
                secs = [seconds(p, max_swaps=max_swaps) for p in plans]
                swaps = ", no swaps" if max_swaps == 0 else ""
                cell[f"rotation of {len(plans)} planned (fixed sets{swaps}), mean"] = (
                    float(np.mean(secs)), wall)
                rotations[(skip, max_swaps)] = {"plans": plans, "seconds": secs}
            rows[(name, skip)] = cell
            print(f"planned {name}, {_pct(skip)} skip", flush=True)
    return rows, rotations


def iteration_table(rows: dict, grid: dict) -> str:
    lines = [
        f"**Simulated** makespan of one iteration ({MICROBATCHES} microbatches of 8 x 1024 "
        "tokens, the reference's 500M costs: w = 1.76 s per stage forward, 32 MiB per hop, "
        "0.35 s per hop, GCP 12-region table, node k in region k % 12, memory 3, FIFO); "
        "**measured** planner wall time on this machine (2 shared CPU cores; planner cap "
        f"{grid['evaluations']} evaluations / {grid['budget_s']} s per call, "
        f"{grid['rotation_budget_s']} s per rotation schedule, seed 0).", "",
        "| instance | skip | schedule | makespan (s) | vs full pipelines | planner (s) |",
        "|---|---|---|---|---|---|"]
    for (name, skip), cell in rows.items():
        base = cell["full pipelines"][0]
        for label, (sec, wall) in cell.items():
            change = "—" if label == "full pipelines" else f"{sec / base - 1:+.1%}"
            lines.append(f"| {name} | {_pct(skip)} | {label} | {sec:.2f} | {change} "
                         f"| {'—' if wall is None else f'{wall:.1f}'} |")
    return "\n".join(lines)


# -- part 2: training --------------------------------------------------------------------------


def data_config(dataset: str):
    """``pystdlib``: Python source, far from converged in 800 iterations; ``synthetic``: Markov
    domains of known entropy rate that the proxy nearly reaches (training to convergence)."""
    config = default_data_config()
    config.max_bytes_per_domain = PROXY["max_bytes_per_domain"]
    if dataset == "synthetic":
        config.source = "synthetic"
    return config


def entropy_floor(data) -> float:
    """Token-weighted mean entropy rate of the validation rows' domains (nats per byte)."""
    counts = np.bincount(data.val_domain_ids, minlength=len(data.domains))
    rates = np.array([data.entropy_rate[d] for d in data.domains])
    return float(counts @ rates / counts.sum())


def make_model(vocab_size: int) -> StagedLlama:
    cfg = LlamaConfig(vocab_size=vocab_size, d_model=PROXY["d_model"], n_heads=PROXY["n_heads"],
                      n_layers=PROXY["n_stages"], d_ff=PROXY["d_ff"])
    return StagedLlama(cfg, PROXY["n_stages"], skip_by_branching=True)


class Trainer:
    """One model, optimizer and jitted step shared by every run (every route has one shape)."""

    def __init__(self, data, steps: int):
        self.data, self.steps = data, steps
        self.model = make_model(data.tokenizer.vocab_size)
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, PROXY["lr"], min(PROXY["warmup"], max(1, steps // 5)), steps, PROXY["lr"] / 10)
        self.tx = stage_adamw(schedule)
        self.step = jax.jit(make_skippipe_train_step(self.model, self.tx))
        eval_step = jax.jit(make_eval_step(self.model))
        route = jnp.asarray(np.arange(PROXY["n_stages"], dtype=np.int32)[None])

        def evaluate(params, batches):
            sums = np.zeros(2)
            for rows in batches:
                sums += np.asarray(jax.device_get(eval_step(params, jnp.asarray(rows), route)))
            return float(sums[0] / sums[1])

        self.evaluate = evaluate

    def train(self, routes: list, seed: int, grid: dict):
        batch = MICROBATCHES * PROXY["rows_per_microbatch"]
        batches = train_iterator(self.data, batch_size=batch, seed=seed)
        val = eval_batches(self.data, batch_size=PROXY["eval_batch_size"],
                           num_batches=grid["eval_batches"])
        state = init_state(self.model, self.tx, jax.random.key(seed))
        routes = [jnp.asarray(r) for r in routes]
        steps_done, val_loss, train_loss = [0], [self.evaluate(state.params, val)], []
        start = time.perf_counter()
        for t in range(1, self.steps + 1):
            state, metrics = self.step(state, jnp.asarray(next(batches)),
                                       routes[(t - 1) % len(routes)])
            if t % grid["eval_every"] == 0 or t == self.steps:
                train_loss.append(float(metrics["loss"]))
                steps_done.append(t)
                val_loss.append(self.evaluate(state.params, val))
        wall = time.perf_counter() - start
        omitted = eval_with_omitted_stages(self.model, state.params, val, keep=KEEP)
        return {"steps": steps_done, "val_loss": val_loss, "train_loss": train_loss,
                "wall_seconds": wall,
                "omitted": {str(k): {"loss": v["loss"], "perplexity": v["perplexity"],
                                     "kept_stages": list(v["kept_stages"][0])}
                            for k, v in omitted.items()}}


def training_routes(variant: Variant, rotations: dict) -> list:
    """The routes of iterations 1, 2, ..., cycled."""
    if variant.skip == 0.0:
        return [np.tile(np.arange(PROXY["n_stages"], dtype=np.int32), (MICROBATCHES, 1))]
    plans = rotations[(variant.skip, variant.max_swaps)]["plans"]
    return [p.route(width=PROXY["n_stages"]) for p in plans]


def run_one(workdir: pathlib.Path, config: dict, trainer: Trainer, routes: list, grid: dict):
    """Trains, or reuses the finished run with the same config.

    The planner stops on its time budget, so re-planned routes may differ slightly from the
    stored run's; the stored run is reused all the same (its makespan is re-simulated).
    """
    path = workdir / "result.json"
    if path.exists():
        stored = json.loads(path.read_text())
        if stored["config"] == config:
            return stored
        print(f"{workdir.name}: config changed, retraining", flush=True)
    result = {"config": config, **trainer.train(routes, config["seed"], grid)}
    workdir.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(result))
    print(f"done {workdir.name}: val {result['val_loss'][-1]:.3f}, "
          f"{result['wall_seconds']:.0f} s", flush=True)
    return result


def iteration_seconds(variant: Variant, rows: dict, rotations: dict, instance: str) -> float:
    """Mean simulated seconds per iteration of a variant's schedules."""
    if variant.skip == 0.0:
        return rows[(instance, SKIPS[0])]["full pipelines"][0]
    return float(np.mean(rotations[(variant.skip, variant.max_swaps)]["seconds"]))


def train_runs(dataset: str, trainer: Trainer, rotations: dict, grid: dict, steps: int,
               out: pathlib.Path, prefix: str) -> dict:
    """Every (variant, seed) run on one dataset, trained or reused."""
    runs = {}
    # The pystdlib runs keep their original names and configs, so stored runs stay reusable.
    tag, extra = ("", {}) if dataset == "pystdlib" else (f"{dataset}-", {"data": dataset})
    for name in check_variants(FLAGS.variants) or VARIANTS:
        for seed in [int(s) for s in FLAGS.seeds] or grid["seeds"]:
            variant = VARIANTS[name]
            config = dict(skip=variant.skip, max_swaps=variant.max_swaps, seed=seed,
                          steps=steps, grid=FLAGS.grid, **PROXY, eval_every=grid["eval_every"],
                          eval_batches=grid["eval_batches"], **extra)
            workdir = out / "runs" / f"{prefix}{tag}{name}-seed{seed}-steps{steps}"
            runs[(name, seed)] = run_one(workdir, config, trainer,
                                         training_routes(variant, rotations), grid)
    return runs


def convergence_table(runs: dict, grid: dict, steps: int, floor: float) -> str:
    base = np.array([runs[("skip0", s)]["val_loss"][-1] for s in grid["seeds"]])
    lines = [
        f"The same proxy, schedules and {steps} iterations on the four default synthetic "
        "domains (Markov chains with known entropy rates, `decjax.data.synthetic`), which the "
        "proxy nearly learns, so the runs end close to convergence. Floor: the token-weighted "
        f"entropy rate of the validation rows, {floor:.3f} nats per byte (the best any model "
        "can do). Seeds " + ", ".join(map(str, grid["seeds"])) + " (mean ± std).", "",
        "| schedules | final val loss | gap vs 0 % | above the floor |", "|---|---|---|---|"]
    for name, variant in VARIANTS.items():
        final = np.array([runs[(name, s)]["val_loss"][-1] for s in grid["seeds"]])
        gap = 100 * (final - base) / base
        lines.append(f"| {variant.label} | {_mean_std(list(final))} | "
                     f"{_mean_std(list(gap), 1).replace(' ± ', ' % ± ')} % | "
                     f"{100 * (np.mean(final) / floor - 1):+.1f} % |")
    return "\n".join(lines)


def check_variants(names: list[str]) -> list[str]:
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise app.UsageError(f"--variants: unknown {unknown}; allowed: {', '.join(VARIANTS)}")
    return names


def _mean_std(values, digits=3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def training_table(runs: dict, grid: dict, steps: int, clock: dict) -> str:
    base = np.array([runs[("skip0", s)]["val_loss"][-1] for s in grid["seeds"]])
    lines = [
        f"{steps} iterations per run, {MICROBATCHES} microbatches of "
        f"{PROXY['rows_per_microbatch']} x {PROXY['seq_len']} bytes; seeds "
        f"{', '.join(map(str, grid['seeds']))} (mean ± std). **Measured**: validation loss "
        "(nats per byte) of the full model (full route) on "
        f"{grid['eval_batches'] * PROXY['eval_batch_size']} fixed validation rows. **Simulated**:"
        " hours = iterations x the simulated makespan of the run's schedules on the 20-node "
        "reference instance (full pipelines for 0 %, the mean of the rotating planned "
        "schedules otherwise). \"0 % run at the same sim. hours\": the full-pipeline runs' "
        "validation loss when this run's simulated clock stops (interpolated).", "",
        "| schedules | final val loss | gap vs 0 % | 0 % run at the same sim. hours "
        "| sim. s / iteration | sim. hours | sim. speed-up | measured train wall (s) |",
        "|---|---|---|---|---|---|---|---|"]
    for name, variant in VARIANTS.items():
        final = np.array([runs[(name, s)]["val_loss"][-1] for s in grid["seeds"]])
        gap = 100 * (final - base) / base
        # The full-pipeline runs' loss (interpolated) when this run's simulated clock stops.
        same_time = [np.interp(steps * clock[name] / clock["skip0"], runs[("skip0", s)]["steps"],
                               runs[("skip0", s)]["val_loss"]) for s in grid["seeds"]]
        lines.append(
            f"| {variant.label} | {_mean_std(list(final))} | "
            f"{_mean_std(list(gap), 1).replace(' ± ', ' % ± ')} % | {_mean_std(same_time)} "
            f"| {clock[name]:.2f} | "
            f"{steps * clock[name] / 3600:.2f} | {clock['skip0'] / clock[name]:.2f}x | "
            f"{np.mean([runs[(name, s)]['wall_seconds'] for s in grid['seeds']]):.0f} |")
    return "\n".join(lines)


def omitted_table(runs: dict, grid: dict) -> str:
    kept = runs[("skip0", grid["seeds"][0])]["omitted"]
    lines = ["Perplexity per byte (exp of the token-mean validation loss) when only some "
             "stages run; io is always kept, kept body stages are evenly spaced and run in "
             "order (`eval_with_omitted_stages`, choice \"spread\"). Mean ± std over seeds; "
             "in brackets the increase over the same model's full-route perplexity.", "",
             "| trained with | " + " | ".join(
                 f"keep {k:.0%} (body stages {kept[str(k)]['kept_stages']})" for k in KEEP)
             + " |", "|---|" + "---|" * len(KEEP)]
    for name, variant in VARIANTS.items():
        cells = []
        for k in KEEP:
            ppl = np.array([runs[(name, s)]["omitted"][str(k)]["perplexity"]
                            for s in grid["seeds"]])
            full = np.array([runs[(name, s)]["omitted"]["1.0"]["perplexity"]
                             for s in grid["seeds"]])
            rel = f" ({100 * np.mean(ppl / full - 1):+.1f} %)" if k != 1.0 else ""
            cells.append(_mean_std(list(ppl), 2) + rel)
        lines.append(f"| {variant.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_training(runs: dict, grid: dict, clock: dict, path: pathlib.Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for name, variant in VARIANTS.items():
        cell = [runs[(name, s)] for s in grid["seeds"]]
        steps = np.array(cell[0]["steps"])
        loss = np.mean([r["val_loss"] for r in cell], axis=0)
        shown = slice(1 if len(steps) > 2 else 0, None)  # the initial ~5.5 flattens the rest
        style = dict(color=variant.color, label=variant.label)
        axes[0].plot(steps[shown], loss[shown], **style)
        axes[1].plot(steps[shown] * clock[name] / 3600, loss[shown], **style)
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("simulated hours (500M costs, 20-node reference instance)")
    for ax in axes:
        ax.set_ylabel("validation loss, full model (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Measured losses of the proxy, mean of {len(grid['seeds'])} seed(s)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv):
    del argv
    jax.config.update("jax_compilation_cache_dir", str(default_cache_dir() / "xla"))
    out = pathlib.Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = GRIDS[FLAGS.grid]
    steps = FLAGS.steps or grid["steps"]
    prefix = "" if FLAGS.grid == "full" else f"{FLAGS.grid}_"
    command = f"python experiments/skippipe/run.py --grid={FLAGS.grid}" + (
        f" --steps={FLAGS.steps}" if FLAGS.steps else "")
    sections = []

    def publish(title: str, table: str) -> None:
        sections.append(f"### {title}\n\n{table}")
        text = "\n\n".join(sections) + f"\n\nProduced by `{command}`."
        write_atomically(out / f"{prefix}results.md", text + "\n")
        print(f"\n### {title}\n\n{table}\n", flush=True)

    rows, rotations = iteration_times(grid)
    publish("1. Iteration time (simulated) and planner time (measured)",
            iteration_table(rows, grid))

    instance = grid["instances"][0]
    clock = {name: iteration_seconds(v, rows, rotations, instance)
             for name, v in VARIANTS.items()}
    runs, floors = {}, {}
    for dataset in grid["datasets"]:
        data = load_data(data_config(dataset), seq_len=PROXY["seq_len"])
        floors[dataset] = entropy_floor(data) if data.entropy_rate else None
        runs[dataset] = train_runs(dataset, Trainer(data, steps), rotations, grid, steps, out,
                                   prefix)
    if FLAGS.variants or FLAGS.seeds:
        print("trained a subset (--variants/--seeds); run without them to write the tables")
        return
    plot_training(runs["pystdlib"], grid, clock, out / f"{prefix}val_loss.png")
    publish("2. Training (measured losses, simulated clock)",
            training_table(runs["pystdlib"], grid, steps, clock)
            + f"\n\nPlot: `{prefix}val_loss.png`.")
    if "synthetic" in runs:
        publish("2b. Training to convergence on synthetic domains (measured)",
                convergence_table(runs["synthetic"], grid, steps, floors["synthetic"]))
    publish("3. Omitted stages at inference (measured)", omitted_table(runs["pystdlib"], grid))
    write_atomically(out / f"{prefix}runs.json", json.dumps(
        {f"{'' if d == 'pystdlib' else d + '/'}{k[0]}|seed{k[1]}": v
         for d, cell in runs.items() for k, v in cell.items()}))
    if FLAGS.grid == "full" and out == pathlib.Path(__file__).parent / "results":
        replace_results_block(out.parent / "README.md", "\n\n".join(sections)
                      + f"\n\nProduced by `{command}`.")
    print(f"results: {out / f'{prefix}results.md'}")


if __name__ == "__main__":
    app.run(main)
