"""The run record: ``config.json``, ``metrics.jsonl``, ``events.jsonl``, plots, TensorBoard.

``metrics.jsonl`` holds one JSON object per line; training lines have ``"split": "train"``,
evaluation lines ``"split": "val"``. ``events.jsonl`` holds what happened to the run
(start, resume, checkpoint, failure, recovery, ...), one event per line with its step, and one
``"work"`` event per step: the microbatches each stage's node processed
(``{"io": M, "stage0": ..., ...}``), which :mod:`decjax.payments` settles.
"""

import json
import os
import pathlib
import re
import time

import matplotlib

matplotlib.use("Agg")  # headless: plots go to files
import matplotlib.pyplot as plt  # noqa: E402

RESULTS_MARKERS = ("<!-- results:start -->", "<!-- results:end -->")


def write_atomically(path: pathlib.Path, text: str | bytes) -> None:
    """Writes ``text`` (or bytes) to ``path`` so that a crash leaves the old file or the new
    one, whole."""
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(text, bytes):
        tmp.write_bytes(text)
    else:
        tmp.write_text(text)
    os.replace(tmp, path)


def replace_results_block(readme: pathlib.Path, text: str, name: str = "") -> None:
    """Replaces the generated block of ``readme`` (between :data:`RESULTS_MARKERS`, or the
    markers ``<!-- results:<name>:start -->`` / ``...:end -->`` of a named block) with ``text``.

    A README without the markers is left untouched.
    """
    start, end = RESULTS_MARKERS
    if name:
        start, end = (m.replace("results:", f"results:{name}:") for m in RESULTS_MARKERS)
    body = readme.read_text()
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if pattern.search(body):
        write_atomically(readme, pattern.sub(lambda _: f"{start}\n{text}\n{end}", body))


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
    path = pathlib.Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunRecord:
    """Appends metrics and events of one run to its workdir.

    Args:
      workdir: the run's folder.
      resume_step: when resuming from a checkpoint at this step, records written after it
        by the interrupted run are moved to ``*.jsonl.stale`` (the resumed run writes them
        again, identically), so ``metrics.jsonl`` reads as one uninterrupted run.
      tensorboard: also write scalars with tensorboardX under ``<workdir>/tb``.
    """

    def __init__(self, workdir: str | pathlib.Path, *, resume_step: int = 0,
                 tensorboard: bool = False):
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.workdir / "metrics.jsonl"
        self.events_path = self.workdir / "events.jsonl"
        for path in (self.metrics_path, self.events_path):
            _set_aside_after(path, resume_step)
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tb"))

    def write_config(self, config_json: str) -> pathlib.Path:
        """Writes ``config.json``; an existing, different one is kept and a new name is used."""
        path = self.workdir / "config.json"
        if path.exists() and path.read_text() != config_json:
            path = self.workdir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(config_json)
        return path

    def metrics(self, step: int, split: str, values: dict) -> None:
        record = {"step": step, "split": split, **values}
        _append(self.metrics_path, record)
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, int | float):
                    self._tb.add_scalar(f"{split}/{key}", value, step)

    def save_trace(self, trace) -> pathlib.Path:
        """Saves the failure trace as ``failure_trace.csv`` (a different one is kept)."""
        path = self.workdir / "failure_trace.csv"
        if path.exists():
            new = path.with_name(f"failure_trace.{time.strftime('%Y%m%d-%H%M%S')}.csv")
            trace.to_csv(new)
            if new.read_bytes() != path.read_bytes():
                return new
            new.unlink()
            return path
        trace.to_csv(path)
        return path

    def event(self, step: int, name: str, **details) -> None:
        _append(self.events_path, {"step": step, "event": name, "time": time.time(), **details})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _append(path: pathlib.Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _set_aside_after(path: pathlib.Path, step: int) -> None:
    """Moves records with ``step > step`` to ``<path>.stale`` (appending, never deleting)."""
    records = read_jsonl(path)
    keep = [r for r in records if r["step"] <= step]
    if len(keep) == len(records):
        return
    stale = [r for r in records if r["step"] > step]
    with path.with_suffix(path.suffix + ".stale").open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in stale)
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def plot_losses(metrics: list[dict], path: str | pathlib.Path, title: str = "") -> pathlib.Path:
    """Train and validation loss against step and against simulated hours, as a PNG."""
    has_sim = any("sim_seconds" in r for r in metrics)
    fig, axes = plt.subplots(1, 2 if has_sim else 1, figsize=(11 if has_sim else 6, 4), dpi=120,
                             squeeze=False)
    axes_x = [(axes[0, 0], "step", 1.0, "step")]
    if has_sim:
        axes_x.append((axes[0, 1], "sim_seconds", 3600.0, "simulated hours"))
    for ax, key, scale, label in axes_x:
        for split, style in (("train", "-"), ("val", "o-")):
            rows = [r for r in metrics if r["split"] == split and "loss" in r and key in r]
            if rows:
                ax.plot([r[key] / scale for r in rows], [r["loss"] for r in rows], style,
                        label=f"{split} loss", markersize=3)
        ax.set_xlabel(label)
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return pathlib.Path(path)
