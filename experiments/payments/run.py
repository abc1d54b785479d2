"""Messages, bytes and latency of SyncPCN and PSyncPCN per payment, and settling a training run.

    python experiments/payments/run.py                # full grid -> results/results.md, PNGs
    python experiments/payments/run.py --grid=quick   # l <= 3, n in {4, 7}, synthetic work log

Every number in the tables is counted by the simulator (decjax.payments): one payment of 100
units over a line of l channels, committees of n = 3f+1 members, every message delayed by
exactly Δ = 1 (so latency is in message delays). The counts are then compared with the formula
each protocol module states for itself and with the spec's §4 estimates, which are derivations
made for this project, not the paper's table. The same cells are rerun with seeded random
delays to check that the message counts do not depend on the schedule.

The last table settles training runs with decjax.payments.settle: a synthetic work log with
uneven per-node work and, in the full grid, the events.jsonl of a real tiny training run
(40–60 s on 2 shared CPU cores; reused when present).
"""

import json
import pathlib
import random
import shutil
import subprocess
import sys
import time

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from decjax.payments import settle as settlement  # noqa: E402
from decjax.payments.graph import ChannelGraph  # noqa: E402
from decjax.payments.psyncpcn import (  # noqa: E402
    FixedDelay,
    PaymentSpec,
    message_formula,
    run_psyncpcn,
)
from decjax.payments.syncpcn import (  # noqa: E402
    Adversary,
    SyncParams,
    optimistic_messages,
    run_syncpcn,
)
from decjax.train.records import replace_results_block, write_atomically  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("grid", "full", ["full", "quick"], "Which grid to run.")
flags.DEFINE_string("out", str(pathlib.Path(__file__).parent / "results"), "Output folder.")

GRIDS = {
    "full": dict(hops=(1, 2, 3, 4, 5, 6), committees=(4, 7, 10, 13), random_seeds=(1, 2, 3),
                 train_run=True),
    "quick": dict(hops=(1, 2, 3), committees=(4, 7), random_seeds=(1,), train_run=False),
}
PROTOCOLS = ("syncpcn", "psyncpcn")
LABELS = {"syncpcn": "SyncPCN", "psyncpcn": "PSyncPCN"}
COLORS = {4: "tab:blue", 7: "tab:green", 10: "tab:orange", 13: "tab:red"}
DELTA = 1.0
VALUE, FEE = 100, 1
K_U = 2  # messages per two-party co-signed update, Brick-style propose-and-countersign (§4)
TRAIN_COMMAND = [sys.executable, "-m", "decjax.train", "--config=configs/payments.py:size=tiny",
                 "--config.log.progress=False", "--config.log.plot=False"]


# -- formulas -------------------------------------------------------------------------------------
def implementation_messages(protocol: str, hops: int, n: int) -> int:
    """What the protocol module says its optimistic run sends."""
    if protocol == "psyncpcn":
        return sum(message_formula(hops, n).values())
    return optimistic_messages(hops, n)


def implementation_latency(protocol: str, hops: int) -> float:
    """Module docstrings: PSyncPCN resolves c_1 after 2l + 1 delays, SyncPCN after (4l + 1)Δ."""
    return 2 * hops + 1 if protocol == "psyncpcn" else 4 * hops + 1


def spec_messages(protocol: str, hops: int, n: int) -> int:
    """Spec §4 [R]: SyncPCN 2l(k_u + 2n), PSyncPCN 2l n^2 + 4l n."""
    if protocol == "psyncpcn":
        return 2 * hops * n * n + 4 * hops * n
    return 2 * hops * (K_U + 2 * n)


def spec_latency(protocol: str, hops: int) -> float:
    """Spec §4 [R]: PSyncPCN about 6l delays; SyncPCN 2l (update + committee round trip), read
    as 2l (2 + 2) = 8l delays."""
    return 6 * hops if protocol == "psyncpcn" else 8 * hops


# -- measuring ------------------------------------------------------------------------------------
def line_graph(hops: int) -> tuple[ChannelGraph, tuple[str, ...]]:
    g = ChannelGraph()
    parties = tuple(f"u{k}" for k in range(hops + 1))
    for a, b in zip(parties, parties[1:], strict=False):
        g.add_channel(a, b, 10 * VALUE, 10 * VALUE)
    return g, parties


def measure(protocol: str, hops: int, n: int, seed: int, fixed: bool) -> dict:
    """One payment of VALUE over ``hops`` channels; counts, latency and checker violations."""
    f = (n - 1) // 3
    g, path = line_graph(hops)
    if protocol == "psyncpcn":
        run = run_psyncpcn(g, [PaymentSpec(path, VALUE, (FEE,) * (hops - 1))], seed=seed, f=f,
                           scheduler=FixedDelay(DELTA) if fixed else None, signer="hmac")
        latency = run.latency[run.records[0].pid]
        time_, depth = latency.time / DELTA, latency.delays
        committed, violations = run.status == ["committed"], run.check()
    else:
        adversary = Adversary(delay=(lambda env: DELTA) if fixed else None)
        run = run_syncpcn(g, [(path[0], path[-1], VALUE, path)],
                          params=SyncParams(delta=DELTA, fee=FEE), seed=seed,
                          adversary=adversary, committee_f=f, signer="hmac")
        time_, depth = run.latency["pay0"] / DELTA, None
        committed = run.records[0].outcomes == ["settled"] * hops
        violations = run.violations()
    return {"protocol": protocol, "hops": hops, "n": n, "f": f, "seed": seed, "fixed": fixed,
            "messages": run.stats.total_messages, "bytes": run.stats.total_bytes,
            "by_kind": dict(sorted(run.stats.count.items())), "latency": time_, "depth": depth,
            "committed": committed, "violations": [f"{v.property}: {v.detail}"
                                                   for v in violations]}


def measure_grid(grid: dict) -> dict:
    cells = {}
    for protocol in PROTOCOLS:
        for n in grid["committees"]:
            for hops in grid["hops"]:
                row = measure(protocol, hops, n, seed=0, fixed=True)
                row["random"] = [measure(protocol, hops, n, seed=s, fixed=False)
                                 for s in grid["random_seeds"]]
                cells[(protocol, n, hops)] = row
    return cells


# -- settling training runs -----------------------------------------------------------------------
def synthetic_work_log(path: pathlib.Path, *, steps: int = 200, stages: int = 4,
                       microbatches: int = 8, skip: float = 0.25, seed: int = 0) -> None:
    """A work log in the trainer's format where each microbatch skips each body stage with
    probability ``skip`` (SkipPipe-like), so nodes did uneven work."""
    rng = random.Random(seed)
    lines = []
    for step in range(1, steps + 1):
        counts = [sum(rng.random() >= skip for _ in range(microbatches)) for _ in range(stages)]
        work = {"io": microbatches, **{f"stage{s}": c for s, c in enumerate(counts)}}
        lines.append(json.dumps({"step": step, "event": "work", "time": 1.7e9 + step,
                                 "microbatches": work}))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, "\n".join(lines) + "\n")


def tiny_training_run(workdir: pathlib.Path) -> pathlib.Path | None:
    """events.jsonl of a real tiny training run (trained once, then reused; the checkpoints
    are deleted)."""
    events = workdir / "events.jsonl"
    if events.exists() and '"event": "end"' in events.read_text():
        print(f"tiny training run: reusing {workdir}", flush=True)
        return workdir
    start = time.perf_counter()
    result = subprocess.run([*TRAIN_COMMAND, f"--workdir={workdir}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        print(f"tiny training run failed; skipping its settlement:\n{result.stderr[-1500:]}")
        return None
    print(f"tiny training run: {time.perf_counter() - start:.0f} s", flush=True)
    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)  # 6 MB; settling needs none
    return workdir


def settle_rows(out: pathlib.Path, grid: dict) -> list[dict]:
    logs = {"synthetic (4 stages, 25% skips, 200 steps)": out / "work_logs" / "synthetic"}
    synthetic_work_log(logs[next(iter(logs))] / "events.jsonl")
    if grid["train_run"]:
        run = tiny_training_run(out / "work_logs" / "tiny_run")
        if run is not None:
            logs["real tiny training run (payments.py:size=tiny)"] = run
    rows = []
    for label, workdir in logs.items():
        work = settlement.read_work(workdir / "events.jsonl")
        for protocol in PROTOCOLS:
            s = settlement.settle(work, price_per_microbatch=10, protocol=protocol, seed=0,
                                  n_relays=6, fee=FEE)
            rows.append(_settle_row(label, s))
    # Deliberately too little capacity: the largest payments cannot be routed and are reported.
    work = settlement.read_work(logs[next(iter(logs))] / "events.jsonl")
    capacity = max(work.values()) * 10 - 1
    small = settlement.settlement_graph(list(work), n_relays=6, seed=0, capacity=capacity)
    s = settlement.settle(work, price_per_microbatch=10, protocol="psyncpcn", seed=0,
                          graph=small, fee=FEE)
    rows.append(_settle_row(f"synthetic, only {capacity:,} per channel side", s))
    return rows


def _settle_row(label: str, s: settlement.Settlement) -> dict:
    paid = [p for p in s.payments if p.status == "paid"]
    return {"log": label, "protocol": s.protocol, "nodes": len(s.payments),
            "microbatches": sum(p.microbatches for p in s.payments),
            "paid": s.total_paid, "fees": s.total_fees, "payer_cost": s.payer_cost,
            "hops": [p.hops for p in s.payments], "messages": s.messages, "bytes": s.bytes,
            "latency_sum": sum(p.latency for p in paid if p.latency is not None),
            "latency_max": max((p.latency for p in paid if p.latency is not None), default=0),
            "failed": [p.node for p in s.failed], "violations": s.violations,
            "amounts": {p.node: p.amount for p in s.payments},
            "received": {p.node: p.received for p in s.payments}}


# -- tables and plots -----------------------------------------------------------------------------
def _mark(measured, formula) -> str:
    return f"{measured:g}" if measured == formula else f"**{measured:g}** (≠ {formula:g})"


def messages_table(cells: dict, grid: dict) -> str:
    lines = ["| n (f) | ℓ | SyncPCN msgs | impl. formula | §4 est. | SyncPCN bytes "
             "| PSyncPCN msgs | impl. formula | §4 est. | PSyncPCN bytes | PSync / Sync msgs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in grid["committees"]:
        for hops in grid["hops"]:
            s, p = cells[("syncpcn", n, hops)], cells[("psyncpcn", n, hops)]
            lines.append(
                f"| {n} ({s['f']}) | {hops} "
                f"| {_mark(s['messages'], implementation_messages('syncpcn', hops, n))} "
                f"| {implementation_messages('syncpcn', hops, n)} "
                f"| {spec_messages('syncpcn', hops, n)} | {s['bytes']:,} "
                f"| {_mark(p['messages'], implementation_messages('psyncpcn', hops, n))} "
                f"| {implementation_messages('psyncpcn', hops, n)} "
                f"| {spec_messages('psyncpcn', hops, n)} | {p['bytes']:,} "
                f"| {p['messages'] / s['messages']:.1f} |")
    return "\n".join(lines)


def latency_table(cells: dict, grid: dict) -> str:
    lines = ["| ℓ | SyncPCN measured | impl. (4ℓ+1) | §4 est. (8ℓ) | SyncPCN, random delays "
             "in [0, Δ] | PSyncPCN measured | impl. (2ℓ+1) | §4 est. (6ℓ) "
             "| PSyncPCN, random delays: causal depth |",
             "|---|---|---|---|---|---|---|---|---|"]
    for hops in grid["hops"]:
        row = [f"| {hops}"]
        for protocol in PROTOCOLS:
            cs = [cells[(protocol, n, hops)] for n in grid["committees"]]
            measured = sorted({c["latency"] for c in cs})
            shown = ", ".join(f"{m:g}" for m in measured)
            formula = implementation_latency(protocol, hops)
            if measured != [formula]:
                shown = f"**{shown}**"
            rand = [r for c in cs for r in c["random"]]
            if protocol == "syncpcn":
                values = [r["latency"] for r in rand]
                extra = f"{min(values):.1f}–{max(values):.1f}"
            else:
                depths = [r["depth"] for r in rand]
                extra = f"{min(depths)}–{max(depths)}"
            row += [shown, f"{formula:g}", f"{spec_latency(protocol, hops):g}", extra]
        lines.append(" | ".join(row) + " |")
    return "\n".join(lines)


def settle_table(rows: list[dict]) -> str:
    lines = ["| work log | protocol | nodes | microbatches | paid | relay fees | payer spent "
             "| hops per payment | messages | bytes | latency (sum / max, Δ) | failed "
             "| violations |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['log']} | {LABELS[r['protocol']]} | {r['nodes']} | {r['microbatches']:,} "
            f"| {r['paid']:,} | {r['fees']} | {r['payer_cost']:,} "
            f"| {', '.join(map(str, r['hops']))} | {r['messages']:,} | {r['bytes']:,} "
            f"| {r['latency_sum']:g} / {r['latency_max']:g} "
            f"| {', '.join(r['failed']) or 'none'} | {len(r['violations'])} |")
    return "\n".join(lines)


def agreement(cells: dict, grid: dict) -> dict:
    out = {}
    for protocol in PROTOCOLS:
        cs = [c for (p, _, _), c in cells.items() if p == protocol]
        msgs = sum(c["messages"] == implementation_messages(protocol, c["hops"], c["n"])
                   for c in cs)
        lat = sum(c["latency"] == implementation_latency(protocol, c["hops"]) for c in cs)
        rand = [(r, c) for c in cs for r in c["random"]]
        rand_same = sum(r["messages"] == c["messages"] for r, c in rand)
        rand_above = sum(r["messages"] > c["messages"] for r, c in rand)
        lock_only = all(r["by_kind"][k] == c["by_kind"][k] for r, c in rand
                        for k in c["by_kind"] if k != "LOCK")
        fewer = sorted({(c["messages"] - r["messages"]) / c["n"] for r, c in rand})
        clean = all(not c["violations"] and c["committed"] for c in cs) and all(
            not r["violations"] and r["committed"] for c in cs for r in c["random"])
        ratio = [c["messages"] / spec_messages(protocol, c["hops"], c["n"]) for c in cs]
        lat_ratio = [c["latency"] / spec_latency(protocol, c["hops"]) for c in cs]
        out[protocol] = dict(cells=len(cs), messages=msgs, latency=lat, random_runs=len(rand),
                             random_same=rand_same, random_above=rand_above,
                             random_only_lock=lock_only, random_fewer_in_n=fewer,
                             clean=clean, spec_ratio=(min(ratio), max(ratio)),
                             spec_latency_ratio=(min(lat_ratio), max(lat_ratio)))
    return out


def summary_text(grid, agree) -> str:
    lines = []
    for protocol in PROTOCOLS:
        a = agree[protocol]
        lines.append(
            f"- **{LABELS[protocol]}**: measured messages equal the module's formula in "
            f"{a['messages']}/{a['cells']} cells and measured latency in {a['latency']}/"
            f"{a['cells']}; with seeded random delays (seeds "
            f"{', '.join(map(str, grid['random_seeds']))}) the count equals the fixed-delay "
            f"count in {a['random_same']}/{a['random_runs']} runs and exceeds it in "
            f"{a['random_above']}{_fewer(a)}; every run committed with no checker violation: "
            f"{'yes' if a['clean'] else '**no**'}. Measured / §4 estimate: messages "
            f"{a['spec_ratio'][0]:.2f}–{a['spec_ratio'][1]:.2f}, latency "
            f"{a['spec_latency_ratio'][0]:.2f}–{a['spec_latency_ratio'][1]:.2f}.")
    return "\n".join(lines)


def _fewer(a: dict) -> str:
    if a["random_same"] == a["random_runs"]:
        return ""
    multiples = ", ".join(f"{x:g}" for x in a["random_fewer_in_n"] if x)
    where = "only LOCK votes" if a["random_only_lock"] else "several message kinds"
    return (f" (the others send fewer: {where}, {multiples} × n fewer; a member of W_i that "
            "holds W_{i+1}'s DECISION-QC before its own trigger skips its n LOCK votes, so the "
            "module's formula is exact for in-order delivery and an upper bound otherwise)")


def plot_messages(cells, grid, path):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3), dpi=110)
    for n in grid["committees"]:
        for protocol, style in (("syncpcn", "--"), ("psyncpcn", "-")):
            hops = list(grid["hops"])
            cs = [cells[(protocol, n, h)] for h in hops]
            label = f"{LABELS[protocol]}, n = {n}"
            axes[0].plot(hops, [c["messages"] for c in cs], style, marker="o", markersize=4,
                         color=COLORS.get(n), label=label)
            axes[0].plot(hops, [implementation_messages(protocol, h, n) for h in hops], "x",
                         color="black", markersize=5)
            axes[1].plot(hops, [c["bytes"] / 1e3 for c in cs], style, marker="o",
                         markersize=4, color=COLORS.get(n), label=label)
    axes[0].set_ylabel("messages per payment (x: module formula)")
    axes[1].set_ylabel("kB per payment (simulator's wire-size estimate)")
    for ax in axes:
        ax.set_xlabel("path length ℓ (hops)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("One payment, measured in the simulator (solid: PSyncPCN, dashed: SyncPCN)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_latency(cells, grid, path):
    fig, ax = plt.subplots(figsize=(6.5, 4.3), dpi=110)
    hops = list(grid["hops"])
    n = grid["committees"][0]
    for protocol, color in (("syncpcn", "tab:purple"), ("psyncpcn", "tab:red")):
        ax.plot(hops, [cells[(protocol, n, h)]["latency"] for h in hops], "o-", color=color,
                label=f"{LABELS[protocol]}, measured (every n)")
        ax.plot(hops, [spec_latency(protocol, h) for h in hops], ":", color=color,
                label=f"{LABELS[protocol]}, §4 estimate [R]")
    ax.set_xlabel("path length ℓ (hops)")
    ax.set_ylabel("latency (message delays Δ)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Start to the payer's channel resolved, every delay = Δ")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv):
    del argv
    start = time.perf_counter()
    out = pathlib.Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = GRIDS[FLAGS.grid]
    prefix = "" if FLAGS.grid == "full" else f"{FLAGS.grid}_"
    cells = measure_grid(grid)
    rows = settle_rows(out, grid)
    agree = agreement(cells, grid)
    seconds = time.perf_counter() - start
    command = f"python experiments/payments/run.py --grid={FLAGS.grid}"
    table = "\n\n".join([
        "**Per payment, measured** (simulator counts, every delay Δ = 1, HMAC signatures of "
        "64 bytes). \"impl. formula\": the count each protocol module states "
        "(`psyncpcn.message_formula`, `syncpcn.optimistic_messages`); a measured value that "
        "differs is shown in bold. \"§4 est.\": the spec's reconstructed estimates [R] "
        f"(k_u = {K_U}), not the paper's table.",
        messages_table(cells, grid),
        "**Latency per payment** (start to the payer's channel resolved, in Δ; the same for "
        "every n in the grid). Random-delay columns: SyncPCN with seeded delays uniform in "
        "[0, Δ] (range over n and seeds); PSyncPCN with the default heavy-tailed asynchronous "
        "scheduler, as causal depth in message delays.",
        latency_table(cells, grid),
        summary_text(grid, agree),
        "**Settling training runs** (`decjax.payments.settle`, price 10 per microbatch, fee "
        f"{FEE} per relay hop, 6 relays, f = 1, payments one after another; latency in Δ).",
        settle_table(rows),
        f"Produced by `{command}` in {seconds:.0f} s"
        + (" (the tiny training run included; later invocations reuse it)."
           if grid["train_run"] else "."),
    ])
    plot_messages(cells, grid, out / f"{prefix}messages_vs_hops.png")
    plot_latency(cells, grid, out / f"{prefix}latency_vs_hops.png")
    record = {"cells": [c for c in cells.values()], "settlements": rows, "agreement": agree}
    write_atomically(out / f"{prefix}measurements.json", json.dumps(record, indent=1))
    write_atomically(out / ("results.md" if FLAGS.grid == "full" else f"{FLAGS.grid}.md"),
                     table + "\n")
    if FLAGS.grid == "full" and out == pathlib.Path(__file__).parent / "results":
        replace_results_block(out.parent / "README.md", table)
    plots = ", ".join(str(p) for p in sorted(out.glob(f"{prefix}*.png")))
    print(table + f"\n\nplots: {plots}")


if __name__ == "__main__":
    app.run(main)
