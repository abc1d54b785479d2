"""Combinations no paper has, on shared failure traces: each table is one command.

    python experiments/combinations/run.py --part=reroute     # CheckFree + SkipPipe
    python experiments/combinations/run.py --part=peer_copy   # rebuild vs copy from a peer
    python experiments/combinations/run.py --part=reroute --grid=quick  # seconds (tests)

Every run is ``configs/checkfree.py`` with a method and a failure rate (its folder name says
which), trained by the same loop, in the same simulated world (the CheckFree reference's 500M
model, 6 stages x 3 data-parallel replicas on the 12-region table), and every method at one
(rate, seed) sees the same failure trace. Finished runs are reused.

* ``reroute`` (CheckFree + SkipPipe): plain CheckFree stalls the pipeline while a replacement
  fetches its neighbours' weights; ``checkfree_reroute`` routes microbatches around the lost
  stage during the fetch instead; ``reroute`` never rebuilds and skips every lost stage for
  the rest of the run (and in evaluation). Interior failures, as plain CheckFree.
* ``peer_copy``: with data-parallel replicas a lost stage can be copied, with its optimizer
  state, from the same stage of a peer replica: exact, for the price of one transfer. Against
  CheckFree+ and checkpointing on the same all-stage trace.
"""

import pathlib
import sys

import numpy as np
from absl import app, flags, logging

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `configs` lives at the repository root

from configs import checkfree as checkfree_config  # noqa: E402
from decjax.train.records import read_jsonl, replace_results_block  # noqa: E402
from decjax.train.sweep import sweep  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("part", "reroute", ["reroute", "peer_copy"], "Which table to produce.")
flags.DEFINE_enum("grid", "full", ["full", "quick"], "full: the table; quick: seconds.")
flags.DEFINE_string("out", str(pathlib.Path(__file__).parent / "results"), "Output folder.")

PARTS = {
    "reroute": ("none", "checkfree", "checkfree_reroute", "reroute"),
    "peer_copy": ("none", "checkpoint", "checkfree_plus", "peer_copy"),
}
LABELS = {"none": "no failures", "checkfree": "CheckFree (stall while fetching)",
          "checkfree_reroute": "CheckFree, route around while fetching",
          "reroute": "route around, never rebuild", "checkpoint": "checkpointing",
          "checkfree_plus": "CheckFree+", "peer_copy": "copy from a peer replica"}
GRIDS = {"full": dict(rates=(0.10, 0.33), seeds=(0, 1), size="small", steps=400),
         "quick": dict(rates=(0.33,), seeds=(0,), size="tiny", steps=12)}


def grid_configs(part: str, grid: dict) -> dict:
    """``{run name: config}``; the no-failure baseline once per seed."""
    configs = {}
    for seed in grid["seeds"]:
        for method in PARTS[part]:
            for rate in (0.0,) if method == "none" else grid["rates"]:
                config = checkfree_config.get_config(
                    f"method={method},rate={rate},seed={seed},steps={grid['steps']},"
                    f"size={grid['size']}")
                config.log.progress = False
                configs[f"{method}-rate{rate:.2f}-seed{seed}"] = config
    return configs


def summarise(workdir: pathlib.Path) -> dict:
    events = read_jsonl(workdir / "events.jsonl")
    val = [r for r in read_jsonl(workdir / "metrics.jsonl") if r["split"] == "val"]
    return dict(sim_hours=[r["sim_seconds"] / 3600 for r in val],
                val_loss=[r["loss"] for r in val],
                failures=sum(e["event"] == "failure" for e in events),
                skipped=sum(e.get("iterations", 0) for e in events if e["event"] == "reroute"),
                lost=max([len(e.get("lost", [])) for e in events] + [0]))


def _mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "not reached"
    return (f"{values[0]:.3f}" if len(values) == 1
            else f"{np.mean(values):.3f} ± {np.std(values):.3f}")


def table(part: str, grid: dict, runs: dict) -> str:
    seeds = grid["seeds"]
    baseline = [runs[f"none-rate0.00-seed{s}"] for s in seeds]
    # Target: the no-failure runs' validation loss three quarters of the way through.
    target = float(np.mean([b["val_loss"][int(0.75 * (len(b["val_loss"]) - 1))]
                            for b in baseline]))
    lines = [f"{grid['steps']} iterations, seeds {', '.join(map(str, seeds))} (mean ± std). "
             f"Target validation loss {target:.3f}: the no-failure runs at 75 % of the run.",
             "", "| rate | method | failures | stages lost for good | iterations routed around "
             "| sim. hours to target | final val loss | sim. hours |",
             "|---|---|---|---|---|---|---|---|"]
    for rate in grid["rates"]:
        for method in PARTS[part]:
            key = "none-rate0.00" if method == "none" else f"{method}-rate{rate:.2f}"
            cell = [runs[f"{key}-seed{s}"] for s in seeds]
            reached = [next((h for h, v in zip(r["sim_hours"], r["val_loss"], strict=True)
                             if v <= target), None) for r in cell]
            lines.append(
                f"| {rate:.0%} | {LABELS[method]} | {np.mean([r['failures'] for r in cell]):.1f} "
                f"| {np.mean([r['lost'] for r in cell]):.1f} "
                f"| {np.mean([r['skipped'] for r in cell]):.1f} "
                f"| {_mean_std(reached)} ({sum(h is not None for h in reached)}/{len(cell)}) "
                f"| {_mean_std([r['val_loss'][-1] for r in cell])} "
                f"| {np.mean([r['sim_hours'][-1] for r in cell]):.2f} |")
    return "\n".join(lines)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
    out = pathlib.Path(FLAGS.out)
    grid = GRIDS[FLAGS.grid]
    workdirs = sweep(grid_configs(FLAGS.part, grid), out / "runs")
    text = table(FLAGS.part, grid, {name: summarise(w) for name, w in workdirs.items()})
    path = out / f"{FLAGS.part}{'' if FLAGS.grid == 'full' else '-' + FLAGS.grid}.md"
    path.write_text(text + "\n")
    if FLAGS.grid == "full":
        readme = pathlib.Path(__file__).parent / "README.md"
        command = f"python experiments/combinations/run.py --part={FLAGS.part}"
        replace_results_block(readme, f"`{command}`:\n\n{text}", name=FLAGS.part)
    print(text)


if __name__ == "__main__":
    app.run(main)
