"""SkipPipe: simulated iteration time, training along skip schedules, omitted-stage inference.

    python experiments/skippipe/run.py                 # the full grid -> results/results.md
    python experiments/skippipe/run.py --grid=quick    # 20 nodes, tiny planner and step counts

Three parts, each writing its table as soon as it is done:

1. **Iteration time (simulated) and planner time (measured).** On the reference instance
   (20 nodes, partition [5, 3, 3, 3, 3, 3]) and an 18-node variant ([3, 3, 3, 3, 3, 3]), at
   25 % and 33 % skip, 30 microbatches, every schedule on one GCMA-style allocation of the
   nodes (as the reference's DT-FM baseline and SkipPipe both use): full pipelines (aligned
   by the allocation), round robin, the planner without collision awareness, the planner, and
   a rotation of planned schedules with fixed stage sets (the schedules trained on in part 2,
   planned once and stored in ``results/rotations.json``). Makespans come from the event
   simulator.
2. **Training (measured losses, simulated clock).** A sweep over ``configs/skippipe.py``
   (every run a ``python -m decjax.train`` config run): a small staged Llama (io + 5 body
   stages of one block each, byte vocabulary, Python standard library) trained for the same
   number of iterations along full pipelines (0 % skip) and along the rotating planned
   schedules of part 1, read from ``rotations.json`` (25 %, 33 %, each also planned without
   adjacent swaps; and 33 % for half the run, then full pipelines). The run's simulated
   clock charges each iteration the makespan of its schedule on the 20-node reference
   instance; the tables check it against part 1's makespans.
3. **Omitted stages.** Every trained model evaluated with 100 %, 75 % and 50 % of its stages
   (from its final checkpoint; stored next to the run as ``omitted.json``).

Finished training runs are reused (``results/runs/<run>/``, when their stored config is
unchanged; a run trained on other schedules than ``rotations.json`` holds stops the grid), so
an interrupted grid resumes where it stopped; ``--variants`` / ``--seeds`` train a subset (e.g.
in parallel processes, started once ``rotations.json`` exists), and a later run without them
reuses those runs and writes the tables.
"""

import json
import pathlib
import sys
import time
from typing import NamedTuple

import jax
import matplotlib.pyplot as plt
import numpy as np
from absl import app, flags, logging

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from configs import skippipe as skippipe_config  # noqa: E402
from decjax.data import default_cache_dir, eval_batches, eval_domain_ids, load_data  # noqa: E402
from decjax.skippipe import (  # noqa: E402
    aligned_pipeline_schedule,
    eval_with_omitted_stages,
    full_pipeline_schedule,
    gcma_allocation,
    load_rotations,
    makespan,
    plan,
    reference_instance,
    rotating_plans,
    rotation_key,
    round_robin_schedule,
    routes_digest,
    save_rotations,
    stage_major_allocation,
    validate,
)
from decjax.train import restore_run  # noqa: E402
from decjax.train.records import read_jsonl, replace_results_block, write_atomically  # noqa: E402
from decjax.train.sweep import sweep_or_exit  # noqa: E402

plt.switch_backend("Agg")  # files only
FLAGS = flags.FLAGS
flags.DEFINE_enum("grid", "full", ["full", "quick"], "Which grid to run.")
flags.DEFINE_string("out", str(pathlib.Path(__file__).parent / "results"), "Output folder.")
flags.DEFINE_integer("steps", 0, "Training iterations per run; 0 takes the grid's default.",
                     lower_bound=0)
flags.DEFINE_list("variants", [], "Train only these variants (ids of VARIANTS); no tables.")
flags.DEFINE_list("seeds", [], "Train only these seeds; no tables.")

SKIPS = (0.25, 1 / 3)
# The proxy that is trained (configs/skippipe.py): io (embedding + head) + 5 body stages.
PROXY = skippipe_config.get_config()
MICROBATCHES, N_STAGES = PROXY.train.microbatches, PROXY.model.n_stages
INSTANCES = {"20 nodes (reference)": (5, 3, 3, 3, 3, 3), "18 nodes": (3, 3, 3, 3, 3, 3)}
GRIDS = {
    "full": dict(instances=tuple(INSTANCES), studies=("pystdlib", "synthetic", "deep"),
                 seeds=(0, 1),
                 steps=800, evaluations=4000, gcma_evaluations=2000,
                 budget_s=9.0, rotation_budget_s=3.0, eval_every=50, eval_batches=8),
    "quick": dict(instances=("20 nodes (reference)",), studies=("pystdlib",), seeds=(0,),
                  steps=6, evaluations=40, gcma_evaluations=100,
                  budget_s=0.5, rotation_budget_s=0.3, eval_every=3, eval_batches=2),
}
KEEP = (1.0, 0.75, 0.5)
OMITTED_BATCH = 32  # validation rows per batch of the omitted-stage evaluation


class Variant(NamedTuple):
    label: str
    skip: float
    max_swaps: int  # adjacent swaps allowed per path (the reference: 2)
    color: str
    skip_until: float = 1.0  # fraction of the iterations on skip schedules, full pipelines after


VARIANTS = {
    "skip0": Variant("0 % (full pipelines)", 0.0, 0, "black"),
    "skip25": Variant("25 % skip", 0.25, 2, "tab:blue"),
    "skip25-noswap": Variant("25 % skip, no swaps", 0.25, 0, "tab:cyan"),
    "skip33": Variant("33 % skip", 1 / 3, 2, "tab:red"),
    "skip33-noswap": Variant("33 % skip, no swaps", 1 / 3, 0, "tab:orange"),
    # The skip ratio annealed to 0 (spec §7): the early, fast skip iterations, then full depth.
    "skip33-then-full": Variant("33 % skip (no swaps) for half the run, then full pipelines",
                                1 / 3, 0, "tab:green", skip_until=0.5),
}


class Study(NamedTuple):
    """One set of training runs: a dataset, the proxy's depth and the variants trained."""
    dataset: str
    layers_per_stage: int = 1
    variants: tuple = tuple(VARIANTS)


STUDIES = {
    "pystdlib": Study("pystdlib"),
    "synthetic": Study("synthetic"),
    # Does the skip runs' gap shrink with deeper stages (the paper's hold 4 layers each)?
    "deep": Study("pystdlib", 2, ("skip0", "skip25", "skip25-noswap")),
}


@flags.validator("variants")
def _known_variants(names: list[str]) -> bool:
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise flags.ValidationError(f"unknown {unknown}; allowed: {', '.join(VARIANTS)}")
    return True


@flags.validator("seeds", message="integers >= 0, comma-separated")
def _seed_list(seeds: list[str]) -> bool:
    return all(s.isdigit() for s in seeds)


ROTATIONS = list(dict.fromkeys((v.skip, v.max_swaps) for v in VARIANTS.values() if v.skip))


def _pct(skip: float) -> str:
    return f"{round(100 * skip)} %"


# -- part 1: simulated iteration time, measured planner time ----------------------------------


def allocate(partition, grid: dict):
    """The instance with its nodes allocated GCMA-style (deterministic: the evaluation cap ends
    the search), the allocation's wall time, and its full-pipeline (DT-FM) baseline."""
    _, place, cost, nbytes = reference_instance(partition)
    start = time.perf_counter()
    g = gcma_allocation(place, partition, cost, activation_bytes=nbytes, time_budget_s=600.0,
                        max_evaluations=grid["gcma_evaluations"])
    wall = time.perf_counter() - start
    full = aligned_pipeline_schedule(g.allocation, g.pipelines, MICROBATCHES)
    validate(full, n_stages=cost.n_stages, skip_ratio=0.0)
    return g.allocation, place, cost, nbytes, wall, full


def iteration_times(grid: dict, stored: pathlib.Path) -> tuple[dict, dict]:
    """Rows per (instance, skip), and the rotating plans of the reference instance per skip.

    The rotations are planned once and kept in ``stored`` (the planner stops on its time
    budget, so a re-plan would give other routes than the stored runs were trained on).
    """
    rows, rotations = {}, _load_rotations(stored, grid)
    reference = grid["instances"][0]  # also gets the rotations that are trained on
    search = dict(max_evaluations=grid["evaluations"], time_budget_s=grid["budget_s"])
    for name in grid["instances"]:
        alloc, place, cost, nbytes, alloc_s, full = allocate(INSTANCES[name], grid)
        n_stages = cost.n_stages
        stage_major = full_pipeline_schedule(stage_major_allocation(INSTANCES[name]),
                                             MICROBATCHES)
        for skip in SKIPS:
            args = dict(n_microbatches=MICROBATCHES, skip_ratio=skip, activation_bytes=nbytes)

            def seconds(schedule, skip=skip, place=place, cost=cost, nbytes=nbytes, n=n_stages,
                        max_swaps=2):
                validate(schedule, n_stages=n, skip_ratio=skip, max_swaps=max_swaps)
                return makespan(schedule, place, cost, activation_bytes=nbytes).seconds

            cell = {"full pipelines": (makespan(full, place, cost,
                                                activation_bytes=nbytes).seconds, alloc_s),
                    "full pipelines, stage-major allocation": (seconds(stage_major, 0.0), None),
                    "round robin (unaware)": (seconds(round_robin_schedule(alloc, MICROBATCHES,
                                                                           skip)), None)}
            for aware, label in ((False, "SkipPipe without collision awareness"),
                                 (True, "SkipPipe (collision aware)")):
                start = time.perf_counter()
                s = plan(alloc, place, cost, **args, collision_aware=aware, **search)
                cell[label] = (seconds(s), time.perf_counter() - start)
            for max_swaps in [m for k, m in ROTATIONS if k == skip and name == reference]:
                key = rotation_key(skip, max_swaps)
                if key not in rotations or not np.array_equal(
                        rotations[key]["plans"][0].node_stage, alloc):
                    start = time.perf_counter()
                    plans = rotating_plans(alloc, place, cost, **args, count=n_stages,
                                           max_swaps=max_swaps,
                                           max_evaluations=grid["evaluations"],
                                           time_budget_s=grid["rotation_budget_s"])
                    rotations[key] = {"plans": plans,
                                      "wall": (time.perf_counter() - start) / len(plans)}
                    save_rotations(stored, rotations, _planner_settings(grid))
                plans = rotations[key]["plans"]
                secs = [seconds(p, max_swaps=max_swaps) for p in plans]
                rotations[key]["seconds"] = secs
                swaps = ", no swaps" if max_swaps == 0 else ""
                cell[f"rotation of {len(plans)} planned (fixed sets{swaps}), mean"] = (
                    float(np.mean(secs)), rotations[key]["wall"])
            rows[(name, skip)] = cell
            print(f"planned {name}, {_pct(skip)} skip", flush=True)
    return rows, rotations


def _load_rotations(path: pathlib.Path, grid: dict) -> dict:
    """Stored rotations planned with this grid's planner settings, else none."""
    if not path.exists():
        return {}
    planner, rotations = load_rotations(path)
    return rotations if planner == _planner_settings(grid) else {}


def _planner_settings(grid: dict) -> dict:
    return {k: grid[k] for k in ("evaluations", "rotation_budget_s", "gcma_evaluations")}


def iteration_table(rows: dict, grid: dict) -> str:
    lines = [
        f"**Simulated** makespan of one iteration ({MICROBATCHES} microbatches of 8 x 1024 "
        "tokens, the reference's 500M costs: w = 1.76 s per stage forward, 32 MiB per hop, "
        "0.35 s per hop, GCP 12-region table, node k in region k % 12, memory 3, FIFO), "
        "every schedule on the instance's GCMA-style allocation (`gcma_allocation`, "
        f"{grid['gcma_evaluations']} partitions scored; full pipelines on its aligned "
        "pipelines, as the reference's DT-FM baseline), and for comparison full pipelines on "
        "the stage-major allocation; **measured** planner wall time on this machine (2 shared "
        f"CPU cores; planner cap {grid['evaluations']} evaluations / {grid['budget_s']} s per "
        f"call, {grid['rotation_budget_s']} s per rotation schedule, seed 0; for full "
        "pipelines the allocation's wall time).", "",
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


def run_configs(study_name: str, grid: dict, steps: int, plans_file: pathlib.Path,
                prefix: str) -> dict:
    """``{run name: (variant, seed, config)}``: one ``configs/skippipe.py`` config per variant
    and seed of a study, all reading their schedules from ``plans_file``."""
    study, runs = STUDIES[study_name], {}
    tag = "" if study_name == "pystdlib" else f"{study_name}-"
    for name in [v for v in FLAGS.variants or VARIANTS if v in study.variants]:
        variant = VARIANTS[name]
        for seed in [int(s) for s in FLAGS.seeds] or grid["seeds"]:
            config = skippipe_config.get_config(
                f"skip={variant.skip},swaps={variant.max_swaps},until={variant.skip_until},"
                f"layers={study.layers_per_stage},seed={seed},steps={steps},"
                f"dataset={study.dataset}")
            config.train.update(eval_every=grid["eval_every"], eval_batches=grid["eval_batches"])
            config.method.update(plans_file=str(plans_file),
                                 gcma_evaluations=grid["gcma_evaluations"])
            runs[f"{prefix}{tag}{name}-seed{seed}-steps{steps}"] = (name, seed, config)
    return runs


def entropy_floor(data, grid: dict) -> float:
    """Token-weighted mean entropy rate of the evaluated validation rows' domains (nats per
    byte): the rows the runs are scored on, whose domain mix is not the whole split's."""
    ids = np.concatenate(eval_domain_ids(data, batch_size=PROXY.train.batch_size,
                                         num_batches=grid["eval_batches"]))
    counts = np.bincount(ids, minlength=len(data.domains))
    rates = np.array([data.entropy_rate[d] for d in data.domains])
    return float(counts @ rates / counts.sum())


def skip_iterations(variant: Variant, steps: int) -> int:
    return round(variant.skip_until * steps) if variant.skip else 0


def sim_seconds(name: str, iterations, clock: dict, steps: int):
    """Simulated seconds after ``iterations`` of a run of ``steps``: its skip schedules' mean
    makespan per iteration, then full pipelines once it stops skipping."""
    done = np.asarray(iterations, dtype=float)
    skipping = np.minimum(done, skip_iterations(VARIANTS[name], steps))
    return skipping * clock[name] + (done - skipping) * clock["skip0"]


def load_run(workdir: pathlib.Path, name: str, rotations: dict, clock: dict, grid: dict) -> dict:
    """A finished run's validation curve, checked against this grid's schedules and clock, and
    its omitted-stage evaluation (computed once from the final checkpoint, then stored)."""
    val = [r for r in read_jsonl(workdir / "metrics.jsonl") if r["split"] == "val"]
    start = next(e for e in read_jsonl(workdir / "events.jsonl") if e["event"] == "start")
    variant = VARIANTS[name]
    if variant.skip:
        plans = rotations[rotation_key(variant.skip, variant.max_swaps)]["plans"]
        if start["routes_digest"] != routes_digest([p.route(width=N_STAGES) for p in plans]):
            raise SystemExit(f"error: {workdir} was trained on other schedules than "
                             "rotations.json holds: delete the run or choose another --out")
    steps = [r["step"] for r in val]
    expected = sim_seconds(name, steps, clock, steps[-1])
    recorded = [r["sim_seconds"] for r in val]
    if not np.allclose(recorded, expected, rtol=1e-6):  # the loop's clock is the table's
        raise SystemExit(f"error: {workdir}: simulated clock {recorded[-1]:.1f} s, the tables "
                         f"price it at {expected[-1]:.1f} s")
    path = workdir / "omitted.json"
    if not path.exists():
        _, model, data, params = restore_run(workdir)
        rows = eval_batches(data, batch_size=OMITTED_BATCH, num_batches=grid["eval_batches"])
        omitted = eval_with_omitted_stages(model, params, rows, keep=KEEP)
        write_atomically(path, json.dumps({
            str(k): {"loss": v["loss"], "perplexity": v["perplexity"],
                     "kept_stages": list(v["kept_stages"][0])} for k, v in omitted.items()}))
    return {"steps": steps, "val_loss": [r["loss"] for r in val], "sim_seconds": recorded,
            "wall_seconds": val[-1]["wall_seconds"], "omitted": json.loads(path.read_text())}


def iteration_seconds(variant: Variant, rows: dict, rotations: dict, instance: str) -> float:
    """Mean simulated seconds per iteration of a variant's schedules."""
    if variant.skip == 0.0:
        return rows[(instance, SKIPS[0])]["full pipelines"][0]
    return float(np.mean(rotations[rotation_key(variant.skip, variant.max_swaps)]["seconds"]))


def train_runs(study_name: str, rotations: dict, clock: dict, grid: dict, steps: int,
               out: pathlib.Path, prefix: str) -> dict:
    """Every (variant, seed) run of one study, trained or reused (:func:`sweep`)."""
    configs = run_configs(study_name, grid, steps, out / f"{prefix}rotations.json", prefix)
    workdirs = sweep_or_exit({run: config for run, (_, _, config) in configs.items()},
                             out / "runs")
    return {(name, seed): load_run(workdirs[run], name, rotations, clock, grid)
            for run, (name, seed, _) in configs.items()}


def _mean_std(values, digits=3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def _trained(runs: dict) -> list:
    """The variants (name, Variant) that ``runs`` holds, in table order."""
    return [(name, v) for name, v in VARIANTS.items() if any(k[0] == name for k in runs)]


def iterations_to_reach(run: dict, loss: float) -> float:
    """First (interpolated) iteration at which a run's validation loss reaches ``loss``;
    ``inf`` if it never does."""
    best = np.minimum.accumulate(run["val_loss"])
    if loss < best[-1]:
        return float("inf")
    return float(np.interp(-loss, -best, run["steps"]))


def training_table(runs: dict, grid: dict, steps: int, clock: dict,
                   floor: float | None = None) -> str:
    """Final losses at equal iterations, and the full-pipeline runs priced on the same clock."""
    seeds = grid["seeds"]
    base = np.array([runs[("skip0", s)]["val_loss"][-1] for s in seeds])
    head = ["schedules", "final val loss", "gap vs 0 %"] + (
        ["above the floor"] if floor else []) + [
        "0 % run at the same sim. hours", "sim. time speed-up to equal loss",
        "sim. s / iteration", "sim. hours", "measured train wall (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, variant in _trained(runs):
        final = np.array([runs[(name, s)]["val_loss"][-1] for s in seeds])
        gap = 100 * (final - base) / base
        elapsed = float(sim_seconds(name, steps, clock, steps))
        # The full-pipeline runs' loss (interpolated) when this run's simulated clock stops,
        # and the simulated time they need to reach this run's final loss (same seed).
        same_time = [np.interp(elapsed / clock["skip0"], runs[("skip0", s)]["steps"],
                               runs[("skip0", s)]["val_loss"]) for s in seeds]
        speedup = [iterations_to_reach(runs[("skip0", s)], f) * clock["skip0"] / elapsed
                   for s, f in zip(seeds, final, strict=True)]
        cells = [variant.label, _mean_std(list(final)),
                 _mean_std(list(gap), 1).replace(" ± ", " % ± ") + " %"]
        if floor:
            cells.append(f"{100 * (np.mean(final) / floor - 1):+.1f} %")
        cells += [_mean_std(same_time),
                  _mean_std(speedup, 2).replace(" ± ", "x ± ") + "x"
                  if np.isfinite(speedup).all()  # else the full runs never got there:
                  else f"> {steps * clock['skip0'] / elapsed:.2f}x",
                  f"{elapsed / steps:.2f}", f"{elapsed / 3600:.2f}",
                  f"{np.mean([runs[(name, s)]['wall_seconds'] for s in seeds]):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def training_intro(grid: dict, steps: int) -> str:
    return (
        f"{steps} iterations per run, {MICROBATCHES} microbatches of "
        f"{PROXY.train.batch_size // MICROBATCHES} x {PROXY.model.seq_len} bytes; seeds "
        f"{', '.join(map(str, grid['seeds']))} (mean ± std). **Measured**: validation loss "
        "(nats per byte) of the full model (full route) on "
        f"{grid['eval_batches'] * PROXY.train.batch_size} fixed validation rows. **Simulated**:"
        " hours = iterations x the simulated makespan of the run's schedules on the 20-node "
        "reference instance with its GCMA-style allocation (full pipelines on the aligned "
        "pipelines for 0 %, the mean of the rotating planned schedules otherwise; a run that "
        "stops skipping is priced per iteration accordingly). \"0 % run "
        "at the same sim. hours\": the full-pipeline runs' validation loss when this run's "
        "simulated clock stops (interpolated). \"Sim. time speed-up to equal loss\": the "
        "simulated hours the full-pipeline run of the same seed needs to reach this run's final "
        "loss, divided by this run's hours (above 1: this run got there sooner; \"> x\" when "
        "the full-pipeline runs never got there).")


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


STUDY_TITLES = {"pystdlib": "Python source (far from converged)",
                "synthetic": "synthetic Markov domains (near convergence)",
                "deep": "Python source, 2 blocks per stage"}


def plot_training(runs: dict, grid: dict, clock: dict, floors: dict,
                  path: pathlib.Path) -> None:
    """Validation loss against iterations (left) and simulated hours (right), a row per
    study; the synthetic row also draws the entropy floor."""
    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 4 * len(runs)), dpi=110,
                             squeeze=False)
    for row, (study, cells) in zip(axes, runs.items(), strict=True):
        for name, variant in _trained(cells):
            cell = [cells[(name, s)] for s in grid["seeds"]]
            steps = np.array(cell[0]["steps"])
            loss = np.mean([r["val_loss"] for r in cell], axis=0)
            shown = slice(1 if len(steps) > 2 else 0, None)  # the initial ~5.5 flattens the rest
            style = dict(color=variant.color, label=variant.label)
            row[0].plot(steps[shown], loss[shown], **style)
            row[1].plot(sim_seconds(name, steps[shown], clock, steps[-1]) / 3600,
                        loss[shown], **style)
        row[0].set_xlabel("iteration")
        row[1].set_xlabel("simulated hours (500M costs, 20-node reference instance, GCMA)")
        for ax in row:
            if floors.get(study):
                ax.axhline(floors[study], color="gray", ls=":", label="entropy floor")
            ax.set_ylabel("val loss, full model (nats/byte)")
            ax.set_title(STUDY_TITLES.get(study, study), fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"Measured losses of the proxy, mean of {len(grid['seeds'])} seed(s)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # no per-checkpoint log lines
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

    rows, rotations = iteration_times(grid, out / f"{prefix}rotations.json")
    publish("1. Iteration time (simulated) and planner time (measured)",
            iteration_table(rows, grid))

    instance = grid["instances"][0]
    clock = {name: iteration_seconds(v, rows, rotations, instance)
             for name, v in VARIANTS.items()}
    runs, floors = {}, {}
    for name in grid["studies"]:
        runs[name] = train_runs(name, rotations, clock, grid, steps, out, prefix)
        if STUDIES[name].dataset == "synthetic":
            data = skippipe_config.get_config("dataset=synthetic").data
            floors[name] = entropy_floor(load_data(data, seq_len=PROXY.model.seq_len), grid)
    if FLAGS.variants or FLAGS.seeds:
        print("trained a subset (--variants/--seeds); run without them to write the tables")
        return
    plot_training(runs, grid, clock, floors, out / f"{prefix}val_loss.png")
    publish("2. Training (measured losses, simulated clock)",
            training_intro(grid, steps) + "\n\n" + training_table(
                runs["pystdlib"], grid, steps, clock) + f"\n\nPlot: `{prefix}val_loss.png`.")
    if "synthetic" in runs:
        publish("2b. Training to convergence on synthetic domains (measured losses, simulated "
                "clock)",
                f"The same proxy, schedules and {steps} iterations on the four default "
                "synthetic domains (Markov chains with known entropy rates, "
                "`decjax.data.synthetic`), which the proxy nearly learns, so the runs end close "
                "to convergence. Floor: the token-weighted entropy rate of the evaluated "
                "validation rows, "
                f"{floors['synthetic']:.3f} nats per byte (the best any model can do); columns "
                "as in table 2.\n\n"
                + training_table(runs["synthetic"], grid, steps, clock, floors["synthetic"]))
    if "deep" in runs:
        publish("2c. Deeper stages (measured losses, simulated clock)",
                f"Table 2 again with {STUDIES['deep'].layers_per_stage} blocks per stage (10 "
                "blocks in all, 0.69M parameters), the same schedules, clock and Python source, "
                "so a skipped stage or a swap moves a smaller share of the depth; columns as in "
                "table 2.\n\n" + training_table(runs["deep"], grid, steps, clock))
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
