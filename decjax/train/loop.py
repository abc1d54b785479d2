"""``train_and_evaluate(config, workdir)``: the training loop of every decjax run.

Order of work: validate the config, read the data, check any checkpoint in ``workdir``
(all before any compute, so bad input fails fast and nothing on disk is touched), then
train with periodic evaluation and checkpoints, and finally write the loss plot and print a
summary table. A run resumes from its latest checkpoint (parameters, optimizer state,
data position) and reproduces the metrics of an uninterrupted run exactly.
"""

import dataclasses
import pathlib
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from decjax import tree
from decjax.data import eval_batches, load_data, train_iterator
from decjax.models import StagedLlama, full_route
from decjax.train import records
from decjax.train.checkpoint import Checkpointer, abstract
from decjax.train.config import ConfigError, make_model, make_optimizer, make_schedule, validate
from decjax.train.step import abstract_state, init_state, make_eval_step, make_train_step

RouteFn = Callable[[int], np.ndarray]


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What a finished run reports (also printed as a table)."""

    workdir: pathlib.Path
    steps: int
    n_params: int
    first_val_loss: float | None
    final_val_loss: float
    final_train_loss: float
    tokens_per_second: float
    plot: pathlib.Path | None


def checkpoint_meta(config: ml_collections.ConfigDict, model: StagedLlama, tokenizer: str) -> dict:
    """The fields that fix the shapes in a checkpoint; compared on restore."""
    meta = {f"model.{k}": v for k, v in dataclasses.asdict(model.config).items()}
    meta.update({"model.n_stages": model.n_stages, "data.tokenizer": tokenizer,
                 "train.microbatches": config.train.microbatches})
    return meta


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    route_fn: RouteFn | None = None,
    stop_after_step: int | None = None,
) -> RunSummary:
    """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint).

    Args:
      config: a config as made by ``configs/*.py``; validated first.
      workdir: folder for the run record and checkpoints.
      route_fn: ``step -> int32[M, P]`` route of each step; default: the full pipeline.
      stop_after_step: stop (with a checkpoint) after this step, as a preempted job would;
        calling again with the same workdir resumes. ``None`` runs to ``train.steps``.

    Returns:
      A :class:`RunSummary`.
    """
    validate(config)
    workdir = pathlib.Path(workdir)
    data = load_data(config.data, seq_len=config.model.seq_len, cache_dir=workdir / "cache")
    if config.model.vocab_size and config.model.vocab_size < data.vocab_size:
        raise ConfigError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({data.vocab_size}); use 0 to take the tokenizer's size"
        )
    model = make_model(config, data.vocab_size)
    tx = make_optimizer(config)
    ckpt = Checkpointer(workdir, max_to_keep=config.ckpt.keep)
    meta = checkpoint_meta(config, model, data.tokenizer.name)
    t = config.train
    batches = train_iterator(data, batch_size=t.batch_size, seed=config.seed)

    start_step = ckpt.latest_step() or 0
    if start_step:
        target = abstract(abstract_state(model, tx))
        state, data_state = ckpt.restore(start_step, target, meta)
        batches.set_state(data_state)
    else:
        state = init_state(model, tx, jax.random.key(config.seed))

    run = records.RunRecord(workdir, resume_step=start_step, tensorboard=config.log.tensorboard)
    run.write_config(config.to_json_best_effort(indent=2, sort_keys=True))
    n_params = tree.num_params(state.params)
    run.event(start_step, "resume" if start_step else "start", n_params=n_params,
              data=data.summary(), devices=[str(d) for d in jax.devices()])

    route = full_route(t.microbatches, model.n_stages)
    route_fn = route_fn or (lambda step: route)
    train_step = jax.jit(make_train_step(model, tx), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(model))
    val_batches = eval_batches(data, batch_size=t.batch_size, num_batches=t.eval_batches)
    schedule = make_schedule(config)

    def evaluate(step: int, params) -> float:
        sums = [eval_step(params, rows, route) for rows in val_batches]
        loss_sum, n_tokens = (float(sum(x)) for x in zip(*jax.device_get(sums), strict=True))
        val_loss = loss_sum / n_tokens
        run.metrics(step, "val", {"loss": val_loss})
        return val_loss

    first_val = evaluate(0, state.params) if start_step == 0 else None
    last_val = first_val
    tokens_per_step = t.batch_size * config.model.seq_len
    bar = tqdm(total=t.steps, initial=start_step, disable=not config.log.progress,
               desc=f"train {workdir.name}", unit="step", dynamic_ncols=True)
    pending, train_loss, speeds = None, float("nan"), []
    last_logged = (start_step, time.perf_counter())

    def flush(pending) -> float:
        """Writes the metrics of an already dispatched step (keeps dispatch asynchronous)."""
        nonlocal last_logged
        step, metrics = pending
        metrics = jax.device_get(metrics)  # waits for that step to finish
        now = time.perf_counter()
        speed = (step - last_logged[0]) * tokens_per_step / max(now - last_logged[1], 1e-9)
        speeds.append(speed)
        last_logged = (step, now)
        run.metrics(step, "train", {
            "loss": float(metrics["loss"]),
            "lr": float(schedule(step - 1)),
            "grad_norm_io": float(metrics["grad_norm_io"]),
            "grad_norm_body": [float(x) for x in metrics["grad_norm_body"]],
            "tokens": step * tokens_per_step,
            "tokens_per_second": speed,
        })
        bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", val=f"{last_val or float('nan'):.3f}",
                        tok_s=f"{speed:,.0f}")
        return float(metrics["loss"])

    last_step = min(t.steps, stop_after_step or t.steps)
    for step in range(start_step + 1, last_step + 1):
        state, metrics = train_step(state, next(batches), route_fn(step - 1))
        if pending is not None:
            train_loss = flush(pending)
            pending = None
        if step % config.log.every == 0 or step == t.steps:
            pending = (step, metrics)
        if step % t.eval_every == 0 or step == t.steps:
            last_val = evaluate(step, state.params)
        if step % config.ckpt.every == 0 or step == last_step:
            ckpt.save(step, state, batches.get_state(), meta)
            run.event(step, "checkpoint", path=str(ckpt.directory / str(step)))
        bar.update(1)
    if pending is not None:
        train_loss = flush(pending)
    bar.close()
    ckpt.wait()
    ckpt.close()

    metrics_log = records.read_jsonl(run.metrics_path)
    if last_val is None:  # resumed at the final step: nothing new was computed
        last_val = next(r["loss"] for r in reversed(metrics_log) if r["split"] == "val")
        train_loss = next(r["loss"] for r in reversed(metrics_log) if r["split"] == "train")
    plot = None
    if config.log.plot:
        plot = records.plot_losses(metrics_log, workdir / "loss.png", title=workdir.name)
    run.event(last_step, "end" if last_step == t.steps else "stop", val_loss=last_val)
    run.close()
    summary = RunSummary(
        workdir=workdir,
        steps=last_step,
        n_params=n_params,
        first_val_loss=first_val,
        final_val_loss=last_val,
        final_train_loss=train_loss,
        tokens_per_second=float(np.median(speeds)) if speeds else float("nan"),
        plot=plot,
    )
    print(format_summary(summary, metrics_log))
    return summary


def format_summary(summary: RunSummary, metrics_log: list[dict]) -> str:
    """A short table: validation loss at each evaluation, then throughput and files."""
    train = {r["step"]: r for r in metrics_log if r["split"] == "train"}

    def cell(record: dict, key: str, fmt: str) -> str:
        return format(record[key], fmt) if key in record else "-"

    lines = [f"{'step':>8} {'train loss':>11} {'val loss':>9} {'tokens/s':>10}"]
    for r in (r for r in metrics_log if r["split"] == "val"):
        tr = train.get(r["step"], {})
        lines.append(f"{r['step']:>8} {cell(tr, 'loss', '.3f'):>11} {r['loss']:>9.3f} "
                     f"{cell(tr, 'tokens_per_second', ',.0f'):>10}")
    lines.append(f"parameters: {summary.n_params:,}   median tokens/s: "
                 f"{summary.tokens_per_second:,.0f}   (losses in nats/token)")
    lines.append(f"run record: {summary.workdir}/metrics.jsonl")
    if summary.plot:
        lines.append(f"loss plot:  {summary.plot}")
    return "\n".join(lines)
