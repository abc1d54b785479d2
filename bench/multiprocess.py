"""Replicated training over 1, 2 and 4 processes: step time, sync time, bytes moved vs decjax.sim.

    python bench/multiprocess.py                 # dp, diloco, noloco; R = 4; --record appends
    python bench/multiprocess.py --methods=noloco --steps=40

Every run has the same 4 replicas (one per device): one process with 4 CPU devices, 2 with 2,
or 4 with 1, so only the process boundary changes. Measured: median wall seconds of non-sync
steps and of sync steps (sync time = their difference) and the bytes sent over loopback
(``/proc/net/dev``, ``lo``) by the run's syncs: a run of the same length that never syncs
(``sync_every`` past the end) is the baseline for the coordination traffic (heartbeats,
barriers, the logged loss), and the difference divided by the syncs is bytes per sync. Beside
them, ``decjax.sim``'s accounting of one sync of the same run (its ``sim_sync_bytes``, float32
messages) and its simulated WAN seconds on the 12-region table. One process moves no bytes
between processes (its replicas share memory): its sim column is what the same sync costs
when the replicas are on different nodes.
"""

import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from decjax.dist import launch  # noqa: E402

_METHODS = flags.DEFINE_list("methods", ["dp", "diloco", "noloco"], "Methods to time.")
_PROCESSES = flags.DEFINE_list("processes", ["1", "2", "4"], "Process counts (divide 4).")
_STEPS = flags.DEFINE_integer("steps", 60, "Inner steps per run.")
_SYNC_EVERY = flags.DEFINE_integer("sync_every", 10, "H for DiLoCo and NoLoCo.")
_RECORD = flags.DEFINE_bool("record", False, "Append the rows to bench/results/multiprocess.jsonl.")

REPLICAS = 4


def loopback_bytes() -> int:
    for line in pathlib.Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[8])  # transmitted bytes
    raise RuntimeError("no loopback interface in /proc/net/dev")


def run(method: str, processes: int, steps: int, sync_every: int) -> dict:
    """One launched run; returns its metrics and the loopback bytes it sent."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(tmp) / "run"
        command = ["python", "-m", "decjax.train",
                   f"--config={ROOT / 'configs' / 'replicated.py'}:method={method},"
                   f"replicas={REPLICAS}", f"--workdir={workdir}",
                   f"--config.run.steps={steps}", f"--config.run.sync_every={sync_every}",
                   f"--config.run.eval_every={steps}", "--config.run.progress=False"]
        before, began = loopback_bytes(), time.perf_counter()
        rc = launch(command, processes=processes, devices_per_process=REPLICAS // processes,
                    log_dir=pathlib.Path(tmp) / "logs", timeout_s=900, quiet=True)
        sent, wall = loopback_bytes() - before, time.perf_counter() - began
        if rc:
            log = (pathlib.Path(tmp) / "logs" / "process-0.log").read_text()[-2000:]
            raise RuntimeError(f"{method} x{processes}: exit {rc}\n{log}")
        rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"][5:]  # the first steps compile
    return dict(train=train, sent=sent, wall=wall)


def median(values):
    return statistics.median(values) if values else float("nan")


def measure(method: str, processes: int, steps: int, h: int) -> dict:
    synced = run(method, processes, steps, 0 if method == "dp" else h)
    quiet = run("noloco" if method == "dp" else method, processes, steps, steps + 1)
    sync_rows = [r for r in synced["train"] if r["sync"]]
    plain = median([r["step_seconds"] for r in quiet["train"]])
    sync_step = median([r["step_seconds"] for r in sync_rows])
    n_syncs = len([r for r in synced["train"] if r["sync"]])
    # Both runs have the same steps: the difference in loopback bytes is the syncs'.
    per_sync = (synced["sent"] - quiet["sent"]) / max(n_syncs, 1) if processes > 1 else 0.0
    return dict(method=method, processes=processes, replicas=REPLICAS, steps=steps,
                step_s=plain, sync_step_s=sync_step, sync_s=sync_step - plain,
                measured_bytes_per_sync=per_sync,
                sim_bytes_per_sync=median([r["sim_sync_bytes"] for r in sync_rows]),
                sim_wan_s_per_sync=median([r["sim_sync_seconds"] for r in sync_rows]))


def table(rows: list[dict]) -> str:
    lines = ["| method | processes | step s (no sync) | sync step s | sync s | measured MB/sync "
             "| sim MB/sync | measured / sim | sim WAN s/sync |", "|" + "---|" * 9]
    for r in rows:
        ratio = (r["measured_bytes_per_sync"] / r["sim_bytes_per_sync"]
                 if r["processes"] > 1 else float("nan"))
        lines.append(
            f"| {r['method']} | {r['processes']} | {r['step_s']:.4f} | {r['sync_step_s']:.4f} "
            f"| {r['sync_s']:.4f} | {r['measured_bytes_per_sync'] / 1e6:.3f} "
            f"| {r['sim_bytes_per_sync'] / 1e6:.3f} | {ratio:.2f} "
            f"| {r['sim_wan_s_per_sync']:.2f} |")
    return "\n".join(lines)


def main(argv):
    del argv
    rows = []
    for method in _METHODS.value:
        for p in (int(x) for x in _PROCESSES.value):
            if REPLICAS % p:
                raise SystemExit(f"error: --processes={p} must divide {REPLICAS}")
            rows.append(measure(method, p, _STEPS.value, _SYNC_EVERY.value))
            print(f"done {method} x{p}", flush=True)
    print(table(rows))
    if _RECORD.value:
        out = ROOT / "bench" / "results" / "multiprocess.jsonl"
        with out.open("a") as f:
            for r in rows:
                f.write(json.dumps(dict(r, time=time.time(), command=" ".join(sys.argv),
                                        git=_git())) + "\n")


def _git() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=ROOT).stdout.strip()


if __name__ == "__main__":
    app.run(main)
