"""SkipPipe planner on the reference instance: wall time, makespans, reductions, bound and gap.

The reference instance, :func:`decjax.skippipe.reference_instance` (spec skippipe.md §2.1,
§3): 20 nodes, partition ``[5, 3, 3, 3, 3, 3]`` allocated stage-major, node ``k`` in GCP
region ``k % 12``, 0.35 s per hop, ``w = 1.76`` s, 32 MiB per hop, 30 microbatches, 33 % skip,
memory 3, FIFO.
The first table uses the stage-major allocation for every schedule, the full-pipeline baseline
included; the second repeats it on a GCMA-style allocation
(:func:`decjax.skippipe.allocation.gcma_allocation`, spec §2.3), whose full-pipeline baseline
runs on the GCMA-aligned pipelines as the reference's DT-FM baseline does. Its "plan s" column
includes the allocation's wall time, and the planner gets ``--budget`` minus that time. Rows:

* full pipelines: :func:`baseline_makespan` (3 pipelines x 10 microbatches);
* round robin: balanced skipping without network awareness (the reference's "random");
* planned, unaware: :func:`plan` with ``collision_aware=False`` (link seconds only, no TC2);
* planned, aware: :func:`plan` (simulated makespan, the reference's SkipPipe with TC2);
* rotation: the mean and worst of :func:`rotating_plans` (fixed round-robin stage sets).

The lower bound is :func:`lower_bound`; "vs bound" = makespan / bound - 1, the gap. Planner
wall time is per call (the collision-aware call includes its latency phase), on whatever cores
this machine has. ``--exact`` (default on) then compares, on small instances, the bound, the
CP-SAT relaxation's bound (:func:`cpsat_bound`, when ``ortools`` is installed), the optimum
(:func:`exhaustive_plan` where it can enumerate, else CP-SAT-proven) and the planner.

    python bench/skippipe_planner.py
    python bench/skippipe_planner.py --evaluations=20000 --budget=60 --seeds=3
"""

import json
import pathlib
import time

from absl import app, flags

from decjax.skippipe import (
    REFERENCE_PARTITION,
    baseline_makespan,
    cpsat_bound,
    exhaustive_plan,
    lower_bound,
    makespan,
    path_latency,
    plan,
    reference_instance,
    reference_plan,
    rotating_plans,
    round_robin_schedule,
    validate,
)
from decjax.skippipe.allocation import (
    aligned_pipeline_schedule,
    allocation_score,
    gcma_allocation,
)

FLAGS = flags.FLAGS
flags.DEFINE_enum("variant", "checkfree", ["checkfree", "skippipe"],
                  "GCP table: corrected NL-London bandwidth, or skippipe's typo.")
flags.DEFINE_float("gap", 0.0, "Seconds a node stays busy after each task (reference 0.13).")
flags.DEFINE_integer("memory", 3, "Activation slots per node; 0 for no cap.")
flags.DEFINE_enum("priority", "fifo", ["fifo", "backward"], "Task priority on a node.")
flags.DEFINE_integer("microbatches", 30, "Microbatches per iteration.")
flags.DEFINE_integer("evaluations", 4000, "Planner's simulated candidates (max_evaluations).")
flags.DEFINE_float("budget", 9.0, "Planner's time budget in seconds.")
flags.DEFINE_integer("seeds", 1, "Planner seeds to run (seeds 0..n-1); all are printed.")
flags.DEFINE_integer("rotation", 5, "Rotating schedules to plan (0 to skip).")
flags.DEFINE_float("gcma_budget", 2.0, "GCMA allocation time budget in seconds (0 to skip).")

flags.DEFINE_string("reference_plan",
                    str(pathlib.Path(__file__).parent / "data" / "skippipe_reference_plan.json"),
                    "The reference planner's allocation and paths (JSON); empty to skip.")
flags.DEFINE_float("reference_budget", 0.0, "Planner budget (s) on the reference's allocation; "
                   "0: a third of the reference planner's measured time.")
flags.DEFINE_bool("exact", True, "Also compare bounds, optimum and planner on small instances.")
flags.DEFINE_float("cpsat_s", 20.0, "CP-SAT time limit per small instance (needs ortools).")

SKIP = 1 / 3
SMALL = [([2, 2, 2, 2], 3, 0.25), ([2, 1, 1, 1], 3, 0.25), ([2, 2, 2], 4, 1 / 3),
         ([3, 2, 2, 2], 6, 0.25), ([3, 2, 2, 2], 12, 0.25)]


def main(argv):
    del argv
    alloc, place, cost, nbytes = reference_instance(variant=FLAGS.variant)
    sim = dict(task_gap_s=FLAGS.gap, priority=FLAGS.priority, memory=FLAGS.memory or None)
    rr = round_robin_schedule(alloc, FLAGS.microbatches, SKIP)
    sim_ms = 1e3 * min(_seconds_per_call(lambda: _seconds(rr, place, cost, nbytes, sim))
                       for _ in range(5))
    print(f"{place.network.summary()}\n{FLAGS.microbatches} microbatches, 33% skip, memory "
          f"{FLAGS.memory or 'uncapped'}, priority {FLAGS.priority}, task gap {FLAGS.gap} s, "
          f"planner {FLAGS.evaluations} evaluations / {FLAGS.budget} s")
    full = baseline_makespan(rr, place, cost, activation_bytes=nbytes, **sim).seconds
    bound = section("stage-major allocation", alloc, full, 0.0, FLAGS.budget, place, cost,
                    nbytes, sim, rotation=FLAGS.rotation)
    print(f"simulator: {sim_ms:.2f} ms per simulated iteration (round robin, best of 5)")
    print(f"lower bound {bound:.2f} s ({bound / full - 1:+.1%} vs full pipelines); reference "
          "planner on its own allocation: -43% random, -52% without TC2, -59% SkipPipe "
          "(spec §4)")
    if FLAGS.gcma_budget > 0:
        start = time.perf_counter()
        g = gcma_allocation(place, REFERENCE_PARTITION, cost, activation_bytes=nbytes,
                            time_budget_s=FLAGS.gcma_budget)
        alloc_s = time.perf_counter() - start
        aligned = aligned_pipeline_schedule(g.allocation, g.pipelines, FLAGS.microbatches)
        validate(aligned, n_stages=int(alloc.max()) + 1, skip_ratio=0)
        gfull = makespan(aligned, place, cost, activation_bytes=nbytes, **sim).seconds
        print(f"\nGCMA allocation: {alloc_s:.2f} s, {g.evaluations} partitions scored, score "
              f"{g.score:.2f} (DP {g.dp_cost:.2f} + 2 x PP {g.pp_cost:.2f}; stage-major "
              f"{allocation_score(place, alloc, cost, activation_bytes=nbytes)[0]:.2f}), "
              f"stages {g.allocation.tolist()}, pipelines {g.pipelines.tolist()}")
        bound = section("GCMA allocation", g.allocation, gfull, alloc_s,
                        max(FLAGS.budget - alloc_s, 0.5), place, cost, nbytes, sim, rotation=0)
        print(f"lower bound {bound:.2f} s ({bound / gfull - 1:+.1%} vs full pipelines); "
              "reference: baseline 159.98 s, CA 65.68 s (-59%), non-CA 76.53 s (-52%), "
              "random 91.30 s (-43%) (spec §4)")
    if FLAGS.reference_plan:
        against_the_reference(json.loads(pathlib.Path(FLAGS.reference_plan).read_text()), sim)
    if FLAGS.exact:
        small_instances(sim)


def against_the_reference(data, sim):
    """The reference planner's own allocation and collision-aware paths, simulated here, then
    decjax's planner on that allocation with a third of the reference planner's time."""
    _, place, cost, nbytes = reference_instance(variant="skippipe")  # the reference's own table
    regions = [place.network.regions[r] for r in place.node_regions]
    if regions != data["locations"]:
        raise ValueError(f"{FLAGS.reference_plan}: node regions {data['locations']} differ from "
                         f"reference_instance()'s {regions}")
    ref = reference_plan(data["partitions"], data["ca_paths"], data["microbatches_per_path"])
    validate(ref, n_stages=cost.n_stages, skip_ratio=SKIP)
    ref_wall = data["reference_wall_s"]["collision_aware_search"]
    budget = FLAGS.reference_budget or ref_wall / 3
    args = dict(n_microbatches=ref.n_microbatches, skip_ratio=SKIP, activation_bytes=nbytes)
    bound = lower_bound(ref.node_stage, place, cost, **args, **sim)
    ours = _seconds(ref, place, cost, nbytes, sim)
    print(f"\nreference allocation, GCMA score "
          f"{data['gcma_score']:.2f} (its own) {'makespan s':>10} {'vs ref':>8} "
          f"{'vs bound':>8} {'plan s':>7}")
    print(f"{'reference planner, its CA paths':<34} {ours:>10.2f} {0:>+8.1%} "
          f"{ours / bound - 1:>+8.1%} {ref_wall:>7.2f}   "
          f"({data['reference_simulator_s']['collision_aware']:.2f} s in its own simulator)")
    for seed in range(max(FLAGS.seeds, 3)):
        start = time.perf_counter()
        s = plan(ref.node_stage, place, cost, **args, seed=seed, time_budget_s=budget,
                 max_evaluations=FLAGS.evaluations, **sim)
        wall = time.perf_counter() - start
        sec = _seconds(s, place, cost, nbytes, sim)
        print(f"{f'planned, aware, seed {seed}':<34} {sec:>10.2f} {sec / ours - 1:>+8.1%} "
              f"{sec / bound - 1:>+8.1%} {wall:>7.2f}")
    print(f"lower bound {bound:.2f} s; decjax's budget {budget:.2f} s = a third of the "
          f"reference planner's measured {ref_wall:.2f} s (2 CPU cores)")


def _seconds(schedule, place, cost, nbytes, sim):
    validate(schedule, n_stages=cost.n_stages, skip_ratio=SKIP)
    return makespan(schedule, place, cost, activation_bytes=nbytes, **sim).seconds


def section(title, alloc, base, alloc_s, budget, place, cost, nbytes, sim, *, rotation):
    """Rows of one allocation; ``base`` is its full-pipeline makespan. Returns the bound."""
    args = dict(n_microbatches=FLAGS.microbatches, skip_ratio=SKIP, activation_bytes=nbytes)
    search = dict(max_evaluations=FLAGS.evaluations, time_budget_s=budget)
    bound = lower_bound(alloc, place, cost, **args, **sim)
    print(f"\n{title + ' schedule':<34} {'makespan s':>10} {'vs full':>8} {'vs bound':>8} "
          f"{'link s':>8} {'plan s':>7}")

    def row(name, sec, link=float("nan"), wall=float("nan"), skips=True):
        gap = f"{sec / bound - 1:>+8.1%}" if skips else f"{'n/a':>8}"  # bound assumes skipping
        print(f"{name:<34} {sec:>10.2f} {sec / base - 1:>+8.1%} {gap} {link:>8.1f} {wall:>7.2f}")

    def seconds(schedule):
        return _seconds(schedule, place, cost, nbytes, sim)

    rr = round_robin_schedule(alloc, FLAGS.microbatches, SKIP)
    row("full pipelines", base, wall=alloc_s if alloc_s else float("nan"), skips=False)
    row("round robin (unaware)", seconds(rr), path_latency(rr, place, nbytes))
    for seed in range(FLAGS.seeds):
        for aware in (False, True):
            start = time.perf_counter()
            s = plan(alloc, place, cost, **args, collision_aware=aware, seed=seed, **search,
                     **sim)
            wall = time.perf_counter() - start + alloc_s
            name = f"planned, {'aware' if aware else 'unaware'}, seed {seed}"
            row(name, seconds(s), path_latency(s, place, nbytes), wall)
    if rotation:
        start = time.perf_counter()
        plans = rotating_plans(alloc, place, cost, **args, count=rotation, **search, **sim)
        wall = (time.perf_counter() - start) / len(plans)
        secs = [seconds(s) for s in plans]
        row(f"rotation of {len(plans)}, mean", sum(secs) / len(secs), wall=wall)
        row(f"rotation of {len(plans)}, worst", max(secs))
    return bound


def _seconds_per_call(fn, repeats: int = 20) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def small_instances(sim):
    """Bounds, exhaustive optimum (where few enough schedules) and planner on small instances."""
    try:
        import ortools  # noqa: F401
        solver = True
    except ImportError:
        solver = False
    print(f"\n{'small instance':<26} {'bound':>8} {'CP-SAT':>8} {'optimum':>8} {'planned':>8} "
          f"{'gap':>6}")
    for sizes, m, skip in SMALL:
        alloc, place, cost, nbytes = reference_instance(sizes, variant=FLAGS.variant)
        args = dict(n_microbatches=m, skip_ratio=skip, activation_bytes=nbytes, **sim)
        ours = plan(alloc, place, cost, **args)
        ours_s = makespan(ours, place, cost, activation_bytes=nbytes, **sim).seconds
        bound = lower_bound(alloc, place, cost, **args)
        cp = optimal = float("nan")
        if solver:
            cp, _, proven = cpsat_bound(alloc, place, cost, **args, hint=ours,
                                        time_limit_s=FLAGS.cpsat_s)
            optimal = ours_s if proven and ours_s <= cp + 0.01 else float("nan")
        try:
            optimal = exhaustive_plan(alloc, place, cost, **args)[1]
        except ValueError:  # too many schedules to enumerate
            pass
        best = max(bound, cp if cp == cp else 0)
        name = f"{sizes} x {m}, skip {skip:.2f}"
        print(f"{name:<26} {bound:>8.2f} {cp:>8.2f} {optimal:>8.2f} {ours_s:>8.2f} "
              f"{ours_s / best - 1:>+6.1%}")
    print("gap = planned / max(bound, CP-SAT) - 1; optimum: exhaustive, or CP-SAT-proven when "
          "it equals the plan")


if __name__ == "__main__":
    app.run(main)
