"""CheckFree / CheckFree+ against checkpointing and redundant computation, on shared traces.

    python experiments/checkfree/run.py                 # the full grid (about 40 min, 2 cores)
    python experiments/checkfree/run.py --grid=quick    # what `make run` shows (~3 min)
    python experiments/checkfree/run.py --grid=ablation # recovery rules at one failure rate

A sweep over ``configs/checkfree.py`` (one run is ``python -m decjax.train
--config=configs/checkfree.py:method=...,rate=...,seed=...``). Every (rate, seed) pair has one
failure trace shared by every method. A small proxy model trains on real data (the Python
standard library) while the simulated world is costed for the CheckFree reference's 500M
model: 6 stages x 3 replicas over the 12-region table, 6 microbatches of 8 x 1024 tokens. That
fixes the iteration time, the per-iteration failure probability for each hourly rate, and the
checkpoint and weight-transfer times. Finished runs are reused
(:func:`decjax.train.sweep.sweep`), so an interrupted grid resumes where it stopped. Results
go to ``results/``.
"""

import json
import pathlib
import sys

import numpy as np
from absl import app, flags, logging

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `configs` lives at the repository root

import matplotlib.pyplot as plt  # noqa: E402

from configs import checkfree as checkfree_config  # noqa: E402
from decjax.train.records import read_jsonl  # noqa: E402
from decjax.train.sweep import sweep_or_exit  # noqa: E402

plt.switch_backend("Agg")  # files only
FLAGS = flags.FLAGS
flags.DEFINE_enum("grid", "full", ["full", "quick", "ablation"], "Which comparison to run.")
flags.DEFINE_string("out", str(pathlib.Path(__file__).parent / "results"), "Output folder.")
flags.DEFINE_integer("steps", 0, "Iterations per run; 0 takes the grid's default.", lower_bound=0)

METHODS = ("none", "checkpoint", "redundant", "checkfree", "checkfree_plus")
LABELS = {"none": "no failures", "checkpoint": "checkpointing", "redundant": "redundant comp.",
          "checkfree": "CheckFree", "checkfree_plus": "CheckFree+"}
GRIDS = {
    "full": dict(rates=(0.05, 0.10, 0.16, 0.33), seeds=(0, 1, 2), methods=METHODS, steps=400),
    "quick": dict(rates=(0.33,), seeds=(0,), methods=("none", "checkpoint", "checkfree_plus"),
                  steps=150),
}
ABLATION = dict(rate=0.33, seeds=(0, 1, 2), steps=400, variants={
    "weighted average (reference)": dict(recovery="weighted"),
    "uniform average": dict(recovery="uniform"),
    "copy neighbour": dict(recovery="copy"),
    "random re-init": dict(recovery="random"),
    "weighted + averaged Adam moments": dict(recovery="weighted", opt_rule="average"),
})


def make_config(method: str, rate: float, seed: int, steps: int, **method_fields):
    """``configs/checkfree.py`` at ``rate`` failures per stage-hour (0: none)."""
    fields = ",".join(f"{k}={v}" for k, v in method_fields.items())
    config = checkfree_config.get_config(
        ",".join(filter(None, [f"method={method},rate={rate},seed={seed},steps={steps}",
                               fields])))
    config.log.progress = False  # the grid prints a line per finished run
    return config


def run_one(workdir: pathlib.Path, config) -> dict:
    """Trains (or reuses the finished run of the same config) and returns its curves."""
    sweep_or_exit({workdir.name: config}, workdir.parent, progress=False)
    events = read_jsonl(workdir / "events.jsonl")
    val = [r for r in read_jsonl(workdir / "metrics.jsonl") if r["split"] == "val"]
    return {
        "steps": [r["step"] for r in val],
        "sim_hours": [r["sim_seconds"] / 3600 for r in val],
        "val_loss": [r["loss"] for r in val],
        "failures": sum(e["event"] == "failure" for e in events),
        "iteration_seconds": events[0]["sim_iteration_seconds"],
    }


def time_to_target(run: dict, target: float) -> float | None:
    """Simulated hours at the first evaluation at or below ``target`` (None: never)."""
    pairs = zip(run["sim_hours"], run["val_loss"], strict=True)
    return next((h for h, v in pairs if v <= target), None)


def _mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "not reached"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def comparison(grid: dict, out: pathlib.Path, steps: int) -> str:
    runs = {}
    for rate in grid["rates"]:
        for seed in grid["seeds"]:
            for method in grid["methods"]:
                key = (method, 0.0 if method == "none" else rate, seed)
                if key not in runs:
                    workdir = out / "runs" / f"{method}-rate{key[1]:.2f}-seed{seed}"
                    runs[key] = run_one(workdir, make_config(method, rate, seed, steps))
                    print(f"done {workdir.name}: final val {runs[key]['val_loss'][-1]:.3f}, "
                          f"{runs[key]['failures']} failures", flush=True)
    # Target: the no-failure run's validation loss three quarters of the way through.
    baseline = [runs[("none", 0.0, s)] for s in grid["seeds"]]
    quarter = [int(0.75 * (len(b["val_loss"]) - 1)) for b in baseline]
    target = float(np.mean([b["val_loss"][q] for b, q in zip(baseline, quarter, strict=True)]))
    lines = [f"Target validation loss: {target:.3f} (no-failure runs at 75% of {steps} "
             "iterations). Mean ± std over seeds " + ", ".join(map(str, grid["seeds"])) + ".", ""]
    header = "| rate | method | failures | sim. hours to target | final val loss | " \
             "sim. iteration (s) |"
    lines += [header, "|---|---|---|---|---|---|"]
    for rate in grid["rates"]:
        for method in grid["methods"]:
            cell = [runs[(method, 0.0 if method == "none" else rate, s)] for s in grid["seeds"]]
            reached = [time_to_target(r, target) for r in cell]
            n_reached = sum(h is not None for h in reached)
            lines.append(
                f"| {rate:.0%} | {LABELS[method]} | {np.mean([r['failures'] for r in cell]):.1f} "
                f"| {_mean_std(reached)} ({n_reached}/{len(cell)}) "
                f"| {_mean_std([r['val_loss'][-1] for r in cell])} "
                f"| {cell[0]['iteration_seconds']:.1f} |")
        _plot(runs, grid, rate, target, out / f"val_loss_rate{int(rate * 100)}.png")
    (out / "runs.json").write_text(json.dumps({"|".join(map(str, k)): v for k, v in runs.items()}))
    return "\n".join(lines)


def _plot(runs, grid, rate, target, path):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for method in grid["methods"]:
        cell = [runs[(method, 0.0 if method == "none" else rate, s)] for s in grid["seeds"]]
        loss = np.mean([r["val_loss"] for r in cell], axis=0)
        axes[0].plot(cell[0]["steps"], loss, label=LABELS[method])
        axes[1].plot(np.mean([r["sim_hours"] for r in cell], axis=0), loss, label=LABELS[method])
    for ax, xlabel in zip(axes, ("iteration", "simulated hours"), strict=True):
        ax.axhline(target, color="grey", linestyle=":", label="target")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{rate:.0%} failures per stage per hour (mean of {len(grid['seeds'])} seeds)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def ablation(out: pathlib.Path, steps: int) -> str:
    rows = ["| recovery rule | failures | final val loss | perplexity |", "|---|---|---|---|"]
    for name, fields in ABLATION["variants"].items():
        cell = []
        for seed in ABLATION["seeds"]:
            slug = name.split(" (")[0].replace(" ", "_").replace("+", "plus")
            workdir = out / "runs" / f"ablation-{slug}-seed{seed}"
            config = make_config("checkfree", ABLATION["rate"], seed, steps, **fields)
            cell.append(run_one(workdir, config))
        final = [r["val_loss"][-1] for r in cell]
        rows.append(f"| {name} | {np.mean([r['failures'] for r in cell]):.1f} "
                    f"| {_mean_std(final)} | {np.exp(np.mean(final)):.2f} |")
        print(f"done ablation {name}", flush=True)
    swap_rows = ["| schedule (no failures) | final val loss |", "|---|---|"]
    for method, label in (("none", "in order"), ("checkfree_plus", "CheckFree+ swaps")):
        names = {s: f"none-rate0.00-seed{s}" if method == "none" else f"swaps-{method}-seed{s}"
                 for s in ABLATION["seeds"]}  # the in-order runs are the grid's baselines
        final = [run_one(out / "runs" / names[seed],
                         make_config(method, 0.0, seed, steps))["val_loss"][-1]
                 for seed in ABLATION["seeds"]]
        swap_rows.append(f"| {label} | {_mean_std(final)} |")
    return (f"CheckFree (interior failures) at {ABLATION['rate']:.0%}/h, {steps} iterations, "
            f"seeds {ABLATION['seeds']}; perplexity = exp(mean final loss) per byte.\n\n"
            + "\n".join(rows) + "\n\nCost of CheckFree+'s swapped edge pairs without any "
            "failure:\n\n" + "\n".join(swap_rows))


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
    out = pathlib.Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    if FLAGS.grid == "ablation":
        table = ablation(out, FLAGS.steps or ABLATION["steps"])
        (out / "ablation.md").write_text(table + "\n")
    else:
        grid = GRIDS[FLAGS.grid]
        table = comparison(grid, out, FLAGS.steps or grid["steps"])
        (out / f"{FLAGS.grid}.md").write_text(table + "\n")
        plots = ", ".join(str(p) for p in sorted(out.glob("val_loss_rate*.png")))
        table += f"\n\nplots: {plots}\nper-run records: {out / 'runs'}"
    print(table)


if __name__ == "__main__":
    app.run(main)
