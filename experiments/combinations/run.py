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
* ``noloco``: NoLoCo replicas, each a pipeline of one block per stage
  (``configs/replicated.py:stages=4,failures=<p>,recovery=<rule>``), lose interior stages; a
  lost stage is rebuilt inside its replica by CheckFree, or copied from the same stage of a
  peer replica, which NoLoCo lets drift between synchronisations
  (:mod:`decjax.train.stage_failures`).
"""

import json
import pathlib
import sys

import jax
import numpy as np
from absl import app, flags, logging

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `configs` lives at the repository root

from configs import checkfree as checkfree_config  # noqa: E402
from configs import replicated as replicated_config  # noqa: E402
from decjax.train.records import read_jsonl, replace_results_block  # noqa: E402
from decjax.train.sweep import sweep_or_exit  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("part", "reroute", ["reroute", "peer_copy", "noloco"],
                  "Which table to produce.")
flags.DEFINE_enum("grid", "full", ["full", "quick"], "full: the table; quick: seconds.")
flags.DEFINE_string("out", str(pathlib.Path(__file__).parent / "results"), "Output folder.")

PARTS = {
    "reroute": ("none", "checkfree", "checkfree_reroute", "reroute"),
    "peer_copy": ("none", "checkpoint", "checkfree_plus", "peer_copy"),
    "noloco": ("none", "checkfree", "checkfree_uniform", "peer_copy"),
}
REPLICAS = 4  # NoLoCo replicas, one (fake CPU) device each
LABELS = {"none": "no failures", "checkfree": "CheckFree (stall while fetching)",
          "checkfree_reroute": "CheckFree, route around while fetching",
          "reroute": "route around, never rebuild", "checkpoint": "checkpointing",
          "checkfree_plus": "CheckFree+", "peer_copy": "copy from a peer replica"}
NOLOCO_LABELS = {"none": "no failures", "checkfree": "CheckFree inside the replica",
                 "checkfree_uniform": "CheckFree, equal weights",
                 "peer_copy": "copy from a peer replica"}
GRIDS = {"full": dict(rates=(0.10, 0.33), seeds=(0, 1), size="small", steps=400),
         "quick": dict(rates=(0.33,), seeds=(0,), size="tiny", steps=12)}
# Per-step probabilities that a replica loses a stage's node (rates per replica per step).
NOLOCO_GRIDS = {"full": dict(rates=(0.005, 0.02), seeds=(0, 1), size="small", steps=1000),
                "quick": dict(rates=(0.2,), seeds=(0,), size="tiny", steps=12)}


def grid_configs(part: str, grid: dict) -> dict:
    """``{run name: config}``; the no-failure baseline once per seed."""
    configs = {}
    for seed in grid["seeds"]:
        for method in PARTS[part]:
            for rate in (0.0,) if method == "none" else grid["rates"]:
                configs[f"{method}-rate{rate:.3f}-seed{seed}" if part == "noloco"
                        else f"{method}-rate{rate:.2f}-seed{seed}"] = _config(part, method,
                                                                              rate, seed, grid)
    return configs


def _config(part: str, method: str, rate: float, seed: int, grid: dict):
    if part == "noloco":
        config = replicated_config.get_config(
            f"method=noloco,replicas={REPLICAS},seed={seed},steps={grid['steps']},stages=4,"
            f"size={grid['size']},failures={rate},"
            f"recovery={'checkfree' if method == 'none' else method}")
        config.run.progress = False
        return config
    config = checkfree_config.get_config(
        f"method={method},rate={rate},seed={seed},steps={grid['steps']},size={grid['size']}")
    config.log.progress = False
    return config


def summarise(workdir: pathlib.Path) -> dict:
    events = read_jsonl(workdir / "events.jsonl")
    val = [r for r in read_jsonl(workdir / "metrics.jsonl") if r["split"] == "val"]
    return dict(sim_hours=[r["sim_seconds"] / 3600 for r in val],
                val_loss=[r["loss"] for r in val],
                failures=sum(e["event"] == "failure" for e in events),
                skipped=sum(e.get("iterations", 0) for e in events if e["event"] == "reroute"),
                lost=max([len(e.get("lost", [])) for e in events] + [0]))


def summarise_replicas(workdir: pathlib.Path) -> dict:
    result = json.loads((workdir / "result.json").read_text())
    lost = [e for e in read_jsonl(workdir / "events.jsonl") if e["event"] == "stage_failure"]
    return dict(failures=len(lost), val_loss=result["val_loss_mean"],
                averaged=result["val_loss_averaged"][-1], spread=result["spread"][-1],
                error=[e["weight_error"] for e in lost],
                recovery_s=sum(e["sim_recovery_seconds"] for e in lost),
                recovery_mb=sum(e["sim_recovery_bytes"] for e in lost) / 1e6)


def noloco_table(grid: dict, runs: dict) -> str:
    seeds = grid["seeds"]
    lines = [f"{REPLICAS} NoLoCo replicas x 4 stages, {grid['steps']} steps, seeds "
             f"{', '.join(map(str, seeds))} (mean ± std). Validation loss in nats per byte: "
             "the mean over replicas, and of the replicas' average.", "",
             "| failure rate (per replica per step) | recovery | stages lost | rebuilt weights' "
             "relative error | final val loss | averaged model | replica spread "
             "| sim. recovery s (MB moved) |", "|---|---|---|---|---|---|---|---|"]
    for rate in grid["rates"]:
        for method in PARTS["noloco"]:
            key = "none-rate0.000" if method == "none" else f"{method}-rate{rate:.3f}"
            cell = [runs[f"{key}-seed{s}"] for s in seeds]
            errors = [x for r in cell for x in r["error"]]
            lines.append(
                f"| {rate:g} | {NOLOCO_LABELS[method]} "
                f"| {np.mean([r['failures'] for r in cell]):.1f} "
                f"| {f'{np.mean(errors):.3f}' if errors else '–'} "
                f"| {_mean_std([r['val_loss'][-1] for r in cell])} "
                f"| {_mean_std([r['averaged'] for r in cell])} "
                f"| {_mean_std([r['spread'] for r in cell])} "
                f"| {np.mean([r['recovery_s'] for r in cell]):.2f} "
                f"({np.mean([r['recovery_mb'] for r in cell]):.1f}) |")
    return "\n".join(lines)


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
    if FLAGS.part == "noloco":
        jax.config.update("jax_num_cpu_devices", REPLICAS)  # one replica per device
        grid = NOLOCO_GRIDS[FLAGS.grid]
        workdirs = sweep_or_exit(grid_configs(FLAGS.part, grid), out / "runs" / "noloco")
        text = noloco_table(grid, {n: summarise_replicas(w) for n, w in workdirs.items()})
    else:
        grid = GRIDS[FLAGS.grid]
        workdirs = sweep_or_exit(grid_configs(FLAGS.part, grid), out / "runs")
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
