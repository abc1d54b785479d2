"""Data parallel vs DiLoCo (two outer optimizers) vs NoLoCo at 4, 8 and 16 replicas.

    python experiments/noloco/run.py                # the full grid -> results/results.md
    python experiments/noloco/run.py --grid=quick   # R = 4, one seed, 200 steps

Every run trains a small proxy Llama for real (the losses) with the same global batch, split
over R replicas that each read their own data shard. The simulated clock prices the same
number of steps for the NoLoCo paper's Small model (125M parameters, bf16 messages, 0.5M
tokens per step) with one replica per node, placed round robin on the 12-region GCP table.
The grid is a sweep over ``configs/replicated.py`` (:func:`decjax.train.sweep.sweep`), every
run trained by the vmapped one-process trainer (:func:`decjax.train.replicated.train_workdir`)
in ``results/runs/<run>/``. Finished runs with the same config are reused, so an interrupted
grid resumes where it stopped, and a finished run of another config stops the grid instead of
being overwritten; the tables and plots are written once every run of the grid has finished.
"""

import dataclasses
import functools
import json
import pathlib
import sys

import jax
import numpy as np
from absl import app, flags
from ml_collections import ConfigDict

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt  # noqa: E402

from configs import replicated as replicated_config  # noqa: E402
from decjax import sim  # noqa: E402
from decjax.data import default_cache_dir  # noqa: E402
from decjax.train.distributed import run_config  # noqa: E402
from decjax.train.records import replace_results_block, write_atomically  # noqa: E402
from decjax.train.replicated import NOLOCO, RunResult, load_run_data, train_workdir  # noqa: E402
from decjax.train.sweep import sweep_or_exit  # noqa: E402

plt.switch_backend("Agg")  # files only
FLAGS = flags.FLAGS
flags.DEFINE_enum("grid", "full", ["full", "quick"], "Which comparison to run.")
flags.DEFINE_string("out", str(pathlib.Path(__file__).parent / "results"), "Output folder.")
flags.DEFINE_integer("steps", 0, "Inner steps per run; 0 takes the grid's default.", lower_bound=0)

METHODS = ("dp", "diloco", "diloco_nesterov", "noloco")
LABELS = {"dp": "data parallel", "diloco": "DiLoCo, heavy-ball 0.3",
          "diloco_nesterov": "DiLoCo, Nesterov 0.9", "noloco": "NoLoCo, pairs"}
COLORS = {"dp": "black", "diloco": "tab:blue", "diloco_nesterov": "tab:purple",
          "noloco": "tab:red"}
GRIDS = {
    "full": dict(replicas=(4, 8, 16), seeds=(0, 1, 2), steps=500),
    "quick": dict(replicas=(4,), seeds=(0,), steps=200),
}
# The papers' H per 1000 inner steps; a run of n steps uses H * n / 1000, so it makes as many
# outer steps as a 1000-step run with the papers' H (NoLoCo 20, DiLoCo 10).
PAPER_SYNC_EVERY = {"dp": 0, "diloco": 100, "diloco_nesterov": 100, "noloco": 50}
# The model the simulated clock prices: the NoLoCo paper's Small (Table 1).
PRICED = dict(name="NoLoCo-paper Small", params=125e6, bytes_per_value=2,
              tokens_per_step=2**19, device_flops=125e12, hop_overhead_s=0.35)


def sync_every(method: str, steps: int) -> int:
    paper = PAPER_SYNC_EVERY[method]
    return paper and max(1, round(paper * steps / 1000))


def make_config(method: str, n_replicas: int, seed: int, steps: int) -> ConfigDict:
    """``configs/replicated.py`` (warmup and evaluations scaled to the run's length) with the
    papers' H scaled likewise."""
    config = replicated_config.get_config(
        f"method={method},replicas={n_replicas},seed={seed},steps={steps}")
    config.run.update(sync_every=sync_every(method, steps), progress=True)
    return config


# -- the simulated clock ----------------------------------------------------------------------


def compute_seconds_per_step(n_replicas: int) -> float:
    """One replica's forward + backward on its share of the tokens: 6 FLOPs per param-token."""
    tokens = PRICED["tokens_per_step"] / n_replicas
    cost = sim.ComputeCost.from_flops([2 * PRICED["params"] * tokens], PRICED["device_flops"],
                                      backward_factor=2.0, loss_factor=0.0)
    return cost.forward(0) + cost.backward(0)


def communication(result: RunResult, allreduce: str) -> sim.RunCommunication:
    """Per-step communication of ``result``'s run, priced for the Small model."""
    c = result.config
    network = sim.Network.gcp12(hop_overhead_s=PRICED["hop_overhead_s"])
    method = {"dp": "data_parallel", "noloco": "noloco"}.get(c["method"], "diloco")
    return sim.run_communication(
        method, n_steps=c["steps"], nodes=list(range(c["n_replicas"])),
        placement=sim.place_round_robin(network, c["n_replicas"]),
        nbytes=PRICED["params"] * PRICED["bytes_per_value"],
        sync_every=None if method == "data_parallel" else result.sync_every,
        allreduce=allreduce, group_size=NOLOCO["group_size"], pool_size=NOLOCO["pool_size"],
        seed=c["seed"])


def simulate(result: RunResult) -> dict:
    """Bytes and simulated hours (at every evaluation) with a ring and a tree all-reduce."""
    compute = compute_seconds_per_step(result.config["n_replicas"])
    out = {}
    for allreduce in sim.ALLREDUCES:
        comm = communication(result, allreduce)
        clock = comm.clock(compute)
        out[allreduce] = {"bytes": comm.total_bytes, "syncs": comm.n_syncs,
                          "hours": (clock[result.eval_steps] / 3600).tolist(),
                          "comm_hours": comm.total_seconds / 3600}
    return out


# -- tables and plots -------------------------------------------------------------------------


def _mean_std(values, digits=3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def _cell(runs, method, n_replicas, seeds):
    return [runs[(method, n_replicas, s)] for s in seeds]


def results_table(runs, grid, steps) -> str:
    lines = [
        f"{steps} inner steps per run; mean ± std over seeds {', '.join(map(str, grid['seeds']))}"
        ". **Measured** on the trained proxy: validation losses (nats per byte) and the "
        "cross-replica spread. **Simulated** for the NoLoCo paper's Small model on gcp12: "
        "bytes sent and hours (setup in experiments/noloco/README.md).", "",
        "| R | method | H | val loss, replica mean | val loss, averaged model | spread "
        "| outer steps | GB sent (ring) | sim. hours, ring | sim. hours, tree |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for n_replicas in grid["replicas"]:
        for method in METHODS:
            cell = _cell(runs, method, n_replicas, grid["seeds"])
            result, simulated = cell[0]["result"], cell[0]["sim"]
            lines.append(
                f"| {n_replicas} | {LABELS[method]} | {result.sync_every} "
                f"| {_mean_std([r['result'].val_loss_mean[-1] for r in cell])} "
                f"| {_mean_std([r['result'].val_loss_averaged[-1] for r in cell])} "
                f"| {_mean_std([r['result'].spread[-1] for r in cell], 4)} "
                f"| {result.outer_steps} | {simulated['ring']['bytes'] / 1e9:,.0f} "
                f"| {np.mean([r['sim']['ring']['hours'][-1] for r in cell]):.2f} "
                f"| {np.mean([r['sim']['tree']['hours'][-1] for r in cell]):.2f} |")
    return "\n".join(lines)


def perplexity_table(runs, grid) -> str:
    """NoLoCo against each DiLoCo and both against data parallel, as in the paper's Table 2."""
    def ppl(method, n_replicas, key="val_loss_mean"):
        """Final perplexity per byte of every seed."""
        cell = _cell(runs, method, n_replicas, grid["seeds"])
        return np.exp([r["result"].final[key] for r in cell])

    def percent(values):
        return _mean_std(100 * values, 1).replace(" ± ", "% ± ") + "%"

    lines = ["| R | PPL data parallel | PPL DiLoCo heavy-ball | PPL DiLoCo Nesterov | PPL NoLoCo "
             "| PPL NoLoCo averaged model | NoLoCo vs DiLoCo heavy-ball "
             "| NoLoCo vs DiLoCo Nesterov | DiLoCo heavy-ball vs data parallel |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n in grid["replicas"]:
        dp, hb, nes, no = (ppl(m, n) for m in METHODS)
        averaged = ppl("noloco", n, "val_loss_averaged")
        lines.append(f"| {n} | {_mean_std(dp, 2)} | {_mean_std(hb, 2)} | {_mean_std(nes, 2)} "
                     f"| {_mean_std(no, 2)} | {_mean_std(averaged, 2)} "
                     f"| {percent((hb - no) / dp)} | {percent((nes - no) / dp)} "
                     f"| {percent((hb - dp) / dp)} |")
    return ("Perplexity per byte (exp of the final replica-mean loss), mean ± std over seeds. "
            "\"NoLoCo vs DiLoCo\" is the paper's RelDiff = (PPL_DiLoCo − PPL_NoLoCo) / PPL_DP, "
            "computed per seed (the seeds share init and data order across methods): positive "
            "means NoLoCo is better. The last column is DiLoCo's gap to data parallel, "
            "(PPL_DiLoCo − PPL_DP) / PPL_DP.\n\n" + "\n".join(lines))


def plot_curves(runs, grid, n_replicas, path):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110)
    for method in METHODS:
        color = COLORS[method]
        cell = _cell(runs, method, n_replicas, grid["seeds"])
        steps = cell[0]["result"].eval_steps
        mean = np.mean([r["result"].val_loss_mean for r in cell], axis=0)
        averaged = np.mean([r["result"].val_loss_averaged for r in cell], axis=0)
        hours = np.mean([r["sim"]["ring"]["hours"] for r in cell], axis=0)
        shown = slice(1 if len(steps) > 2 else 0, None)  # step 0 (~5.5) would flatten the rest
        axes[0].plot(steps[shown], mean[shown], color=color, label=LABELS[method])
        axes[0].plot(steps[shown], averaged[shown], color=color, linestyle=":", alpha=0.8)
        axes[1].plot(hours[1:], mean[1:], color=color, marker=".", label=LABELS[method])
    axes[0].set_xlabel("inner step")
    axes[1].set_xlabel("simulated hours (Small model, gcp12, ring all-reduce)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"R = {n_replicas} replicas, mean of {len(grid['seeds'])} seeds "
                 "(solid: mean of replica losses; dotted: averaged model)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_communication(runs, grid, path):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110)
    width = 0.8 / len(METHODS)
    x = np.arange(len(grid["replicas"]))
    for k, method in enumerate(METHODS):
        cells = [_cell(runs, method, n, grid["seeds"]) for n in grid["replicas"]]
        gb = [cell[0]["sim"]["ring"]["bytes"] / 1e9 for cell in cells]
        hours = [np.mean([r["sim"]["ring"]["hours"][-1] for r in cell]) for cell in cells]
        for ax, values, fmt in ((axes[0], gb, "{:,.0f}"), (axes[1], hours, "{:.2f}")):
            bars = ax.bar(x + k * width, values, width, color=COLORS[method],
                          label=LABELS[method])
            ax.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=7)
    for ax, ylabel in zip(axes, ("GB sent over links (ring all-reduce)",
                                 "simulated hours incl. communication"), strict=True):
        ax.set_xticks(x + width * (len(METHODS) - 1) / 2, [f"R = {n}" for n in grid["replicas"]])
        ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(METHODS))
    fig.suptitle("Simulated cost of the same number of steps for the 125M Small model, gcp12")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def main(argv):
    del argv
    # Runs of one shape share their compiled steps across seeds and invocations.
    jax.config.update("jax_compilation_cache_dir", str(default_cache_dir() / "xla"))
    out = pathlib.Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = GRIDS[FLAGS.grid]
    steps = FLAGS.steps or grid["steps"]
    data = load_run_data(run_config(make_config("dp", 1, 0, steps)))
    cells = {f"{method}-R{n}-seed{seed}-steps{steps}": (method, n, seed)
             for n in grid["replicas"] for seed in grid["seeds"] for method in METHODS}
    workdirs = sweep_or_exit({name: make_config(*cell, steps) for name, cell in cells.items()},
                             out / "runs", train=functools.partial(train_workdir, data=data))
    runs = {}
    for name, cell in cells.items():
        result = RunResult(**json.loads((workdirs[name] / "result.json").read_text()))
        runs[cell] = {"result": result, "sim": simulate(result)}
    prefix = "" if FLAGS.grid == "full" else f"{FLAGS.grid}_"
    command = f"python experiments/noloco/run.py --grid={FLAGS.grid}" + (
        f" --steps={FLAGS.steps}" if FLAGS.steps else "")
    table = (results_table(runs, grid, steps) + "\n\n" + perplexity_table(runs, grid)
             + f"\n\nProduced by `{command}`.")
    for n_replicas in grid["replicas"]:
        plot_curves(runs, grid, n_replicas, out / f"{prefix}val_loss_R{n_replicas}.png")
    plot_communication(runs, grid, out / f"{prefix}communication.png")
    records = {f"{m}|R{n}|seed{s}": {"result": dataclasses.asdict(v["result"]), "sim": v["sim"]}
               for (m, n, s), v in runs.items()}
    write_atomically(out / f"{prefix}runs.json", json.dumps(records))
    write_atomically(out / ("results.md" if FLAGS.grid == "full" else f"{FLAGS.grid}.md"),
                      table + "\n")
    if FLAGS.grid == "full" and out == pathlib.Path(__file__).parent / "results":
        replace_results_block(out.parent / "README.md", table)
    plots = ", ".join(str(p) for p in sorted(out.glob(f"{prefix}*.png")))
    print(table + f"\n\nplots: {plots}\nper-run records: {out / 'runs'}")


if __name__ == "__main__":
    app.run(main)
