"""Speed of the SkipPipe makespan simulator, and its makespans on the reference instance.

The reference instance (spec skippipe.md §2.1, §3): 20 nodes, partition ``[5, 3, 3, 3, 3, 3]``
(io, then 5 body stages) allocated stage-major, node ``k`` in GCP region ``k % 12``, 0.35 s per
hop on top of the measured latency and bandwidth, 0.055 s per sample and layer with 4 layers
and 8 samples of 1024 tokens per microbatch (``w = 1.76`` s), fp32 activations of ``d = 1024``
(32 MiB per hop), 30 microbatches, memory 3 and FIFO (the reference simulator's rules). It
compares SkipPipe at 33 % skip with the network-unaware :func:`round_robin_schedule` against
the full-pipeline baseline over the same allocation (3 pipelines x 10 microbatches), both on
:func:`decjax.skippipe.makespan`. With memory 3 each io node keeps 3 microbatches in flight,
so the 5 data nodes of SkipPipe against the baseline's 3 account for much of the gap; compare
``--memory=0``.

    python bench/skippipe_simulate.py
    python bench/skippipe_simulate.py --variant=skippipe --gap=0.13 --repeats=500

The planner calls the simulator once per candidate schedule, so it must stay well under 50 ms
per iteration; the printed time is the median over ``--rounds`` of ``--repeats`` calls.
"""

import statistics
import time

from absl import app, flags

from decjax.skippipe import (
    baseline_makespan,
    full_pipeline_schedule,
    makespan,
    reference_instance,
    round_robin_schedule,
    simulate,
)

FLAGS = flags.FLAGS
flags.DEFINE_enum("variant", "checkfree", ["checkfree", "skippipe"],
                  "GCP table: corrected NL-London bandwidth, or skippipe's typo.")
flags.DEFINE_float("gap", 0.0, "Seconds a node stays busy after each task (reference 0.13).")
flags.DEFINE_integer("memory", 3, "Activation slots per node; 0 for no cap.")
flags.DEFINE_enum("priority", "fifo", ["fifo", "backward"], "Task priority on a node.")
flags.DEFINE_integer("microbatches", 30, "Microbatches per iteration.")
flags.DEFINE_integer("repeats", 200, "Simulations per timing round.")
flags.DEFINE_integer("rounds", 5, "Timing rounds (median is reported).")

SKIP = 1 / 3


def seconds_per_call(fn) -> float:
    fn()  # warm up
    rounds = []
    for _ in range(FLAGS.rounds):
        start = time.perf_counter()
        for _ in range(FLAGS.repeats):
            fn()
        rounds.append((time.perf_counter() - start) / FLAGS.repeats)
    return statistics.median(rounds)


def main(argv):
    del argv
    alloc, place, cost, nbytes = reference_instance(variant=FLAGS.variant)
    options = dict(activation_bytes=nbytes, task_gap_s=FLAGS.gap, priority=FLAGS.priority,
                   memory=FLAGS.memory or None)
    skip = round_robin_schedule(alloc, FLAGS.microbatches, SKIP)
    full = full_pipeline_schedule(alloc, FLAGS.microbatches)

    print(f"{place.network.summary()}\nw = {cost.forward(0):.2f} s, {nbytes / 2**20:.0f} MiB per "
          f"hop, {FLAGS.microbatches} microbatches, memory {FLAGS.memory or 'uncapped'}, "
          f"priority {FLAGS.priority}, task gap {FLAGS.gap} s\n")
    print(f"{'schedule':<22} {'makespan s':>10} {'compute':>8} {'comm':>8} {'wait':>8} "
          f"{'idle/node':>9} {'GiB sent':>8} {'sim ms':>7}")
    results = {"full pipelines": (baseline_makespan(skip, place, cost, **options), full),
               "round robin, 33% skip": (makespan(skip, place, cost, **options), skip)}
    for name, (est, sched) in results.items():
        ms = 1e3 * seconds_per_call(lambda s=sched: simulate(s, place, cost, **options))
        b = est.breakdown
        print(f"{name:<22} {est.seconds:>10.2f} {b['compute']:>8.2f} {b['communication']:>8.2f} "
              f"{b['wait']:>8.2f} {est.idle_s:>9.2f} {est.bytes / 2**30:>8.2f} {ms:>7.2f}")
    base, ours = (results[k][0].seconds for k in results)
    print(f"\nreduction vs full pipelines: {1 - ours / base:.1%} "
          f"(reference planner, on its GCMA allocation: -43% "
          "network-unaware, -59% collision-aware; spec §4)")


if __name__ == "__main__":
    app.run(main)
