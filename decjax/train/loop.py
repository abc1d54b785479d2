"""``train_and_evaluate(config, workdir)``: the training loop of every decjax run.

Order of work: validate the config, read the data, check any checkpoint in ``workdir``
(all before any compute, so bad input fails fast and nothing on disk is touched), then
train with periodic evaluation and checkpoints, and finally write the loss plot and print a
summary table. A run resumes from its latest checkpoint (parameters, optimizer state,
data position) and reproduces the metrics of an uninterrupted run exactly.
"""

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from decjax import tree
from decjax.data import eval_batches, load_data, train_iterator
from decjax.models import StagedLlama
from decjax.train import records
from decjax.train.checkpoint import Checkpointer
from decjax.train.config import ConfigError, make_model, make_optimizer, make_schedule, validate
from decjax.train.methods import make_method
from decjax.train.simulation import (
    SimClock,
    check_storage_region,
    make_failure_trace,
    make_world,
)
from decjax.train.step import abstract_state, init_state, make_eval_step

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


def checkpoint_meta(model: StagedLlama, tokenizer: str) -> dict:
    """The fields that fix the shapes in a checkpoint; compared on restore."""
    meta = {f"model.{k}": v for k, v in dataclasses.asdict(model.config).items()}
    meta.update({"model.n_stages": model.n_stages, "data.tokenizer": tokenizer})
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
    t = config.train
    data = load_data(config.data, seq_len=config.model.seq_len, cache_dir=workdir / "cache")
    if config.model.vocab_size and config.model.vocab_size < data.vocab_size:
        raise ConfigError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({data.vocab_size}); use 0 to take the tokenizer's size"
        )
    model, tx = make_model(config, data.vocab_size), make_optimizer(config)
    batches = train_iterator(data, batch_size=t.batch_size, seed=config.seed)
    ckpt = Checkpointer(workdir, max_to_keep=config.ckpt.keep)
    meta = checkpoint_meta(model, data.tokenizer.name)
    world = make_world(config, model)
    check_storage_region(config, world)
    method = make_method(config, model, tx, world, workdir)
    iteration = method.iteration(seed=config.sim.failure_seed)
    # The trace follows the plain pipeline's iteration time, so every method shares it.
    plain_seconds = world.iteration(seed=config.sim.failure_seed).seconds
    trace = make_failure_trace(config, model.n_stages, plain_seconds)
    if trace is not None:
        trace = trace.restrict(method.eligible_stages())
    start_step = ckpt.latest_step() or 0
    if start_step:  # checked against meta before anything is computed
        state, extras = ckpt.restore(start_step, abstract_state(model, tx), meta)
        batches.set_state(extras["iterator"])
        method.set_state(extras.get("method", {}))
        clock, wall_offset = SimClock.from_state(extras["clock"]), extras["wall_seconds"]
    else:
        state = init_state(model, tx, jax.random.key(config.seed))
        clock, wall_offset = SimClock(), 0.0
    wall_start = time.perf_counter()
    model_step = int(jax.device_get(state.step))

    def wall_seconds() -> float:
        return wall_offset + time.perf_counter() - wall_start

    run = records.RunRecord(workdir, resume_step=start_step, tensorboard=config.log.tensorboard)
    run.write_config(config.to_json_best_effort(indent=2, sort_keys=True))
    n_params = tree.num_params(state.params)
    run.event(start_step, "resume" if start_step else "start", n_params=n_params,
              data=data.summary(), devices=[str(d) for d in jax.devices()],
              sim_iteration_seconds=iteration.seconds, sim_breakdown=iteration.breakdown,
              **method.describe())
    if trace is not None:
        run.save_trace(trace)

    route_fn = route_fn or method.route
    train_step = jax.jit(method.train_step(), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(model))
    val_batches = eval_batches(data, batch_size=t.batch_size, num_batches=t.eval_batches)

    def evaluate(step: int, params) -> float:
        route = method.eval_route()  # the whole model, less any stage lost for good
        sums = jax.device_get([eval_step(params, rows, route) for rows in val_batches])
        val_loss = sum(float(s) for s, _ in sums) / sum(float(n) for _, n in sums)
        run.metrics(step, "val", {"loss": val_loss, "sim_seconds": clock.seconds,
                                   "wall_seconds": wall_seconds()})
        return val_loss

    first_val = evaluate(0, state.params) if start_step == 0 else None
    last_step = min(t.steps, stop_after_step or t.steps)
    logger = _TrainLogger(run, make_schedule(config), t.batch_size * config.model.seq_len,
                          start_step, t.steps, config.log.progress, workdir.name)
    last_val, pending, metrics = first_val, None, None
    if start_step == 0:  # e.g. the checkpointing baseline's first checkpoint
        for kind, seconds in method.after_step(0, state, {"iterator": batches.get_state()}).items():
            clock.advance(kind, seconds)
    for step in range(start_step + 1, last_step + 1):
        failed = trace.failures_at(step - 1) if trace is not None else ()
        if len(failed):
            state, rolled_back = _recover(method, run, clock, step, state, failed, metrics,
                                          model.n_stages)
            if rolled_back is not None:
                model_step = rolled_back[0]
                batches.set_state(rolled_back[1]["iterator"])
        route = route_fn(step - 1)
        state, metrics = train_step(state, next(batches), route)
        run.event(step, "work", microbatches=work_done(route, model.n_stages))
        model_step += 1
        if config.sim.straggler_sigma:  # a fresh, seeded straggler draw every step
            iteration = method.iteration(seed=config.sim.failure_seed * 1_000_003 + step)
        clock.advance("iteration", method.step_seconds(step - 1, iteration))
        for kind, seconds in method.after_step(
                step, state, {"iterator": batches.get_state()}).items():
            clock.advance(kind, seconds)
        if pending is not None:  # read step t-1's metrics only after dispatching step t
            logger.write(*pending, val_loss=last_val)
            pending = None
        if step % config.log.every == 0 or step == t.steps:
            pending = (step, metrics, {"sim_seconds": clock.seconds,
                                       "wall_seconds": wall_seconds(), "model_step": model_step})
        if step % t.eval_every == 0 or step == t.steps:
            last_val = evaluate(step, state.params)
        if step % config.ckpt.every == 0 or step == last_step:
            extras = {"iterator": batches.get_state(), "clock": clock.state(),
                      "wall_seconds": wall_seconds(), "method": method.state()}
            ckpt.save(step, state, extras, meta)
            run.event(step, "checkpoint", path=str(ckpt.directory / str(step)))
        logger.bar.update(1)
    if pending is not None:
        logger.write(*pending, val_loss=last_val)
    logger.bar.close()
    ckpt.wait()
    ckpt.close()
    method.close()

    metrics_log = records.read_jsonl(run.metrics_path)
    last = {r["split"]: r["loss"] for r in metrics_log}  # the latest of each split
    plot = None
    if config.log.plot:
        plot = records.plot_losses(metrics_log, workdir / "loss.png", title=workdir.name)
    run.event(last_step, "end" if last_step == t.steps else "stop", val_loss=last["val"])
    run.close()
    summary = RunSummary(
        workdir=workdir,
        steps=last_step,
        n_params=n_params,
        first_val_loss=first_val,
        final_val_loss=last["val"],
        final_train_loss=last.get("train", float("nan")),
        tokens_per_second=_median_speed(logger.speeds, metrics_log),
        plot=plot,
    )
    if start_step >= t.steps:
        print(f"{workdir} had already finished its {t.steps} steps: nothing trained "
              "(raise train.steps to train on)")
    print(format_summary(summary, metrics_log))
    return summary


def restore_run(workdir: str | pathlib.Path):
    """``(config, model, data, params)`` of the run in ``workdir``: its stored config, its data,
    and the parameters of its latest checkpoint (e.g. to evaluate a finished run)."""
    workdir = pathlib.Path(workdir)
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    data = load_data(config.data, seq_len=config.model.seq_len, cache_dir=workdir / "cache")
    model, tx = make_model(config, data.vocab_size), make_optimizer(config)
    ckpt = Checkpointer(workdir, max_to_keep=config.ckpt.keep)
    step = ckpt.latest_step()
    if step is None:
        raise ValueError(f"{workdir} holds no checkpoint to restore")
    state, _ = ckpt.restore(step, abstract_state(model, tx),
                            checkpoint_meta(model, data.tokenizer.name))
    ckpt.close()
    return config, model, data, state.params


def _median_speed(speeds: list[float], metrics_log: list[dict]) -> float:
    """This call's median tokens/s, or the record's if it trained nothing (a finished run)."""
    speeds = speeds or [r["tokens_per_second"] for r in metrics_log
                        if r["split"] == "train" and "tokens_per_second" in r]
    return float(np.median(speeds)) if speeds else float("nan")


def work_done(route_MP, n_stages: int) -> dict[str, int]:
    """Microbatches each stage's node processed in one step (what decjax.payments pays for).

    The io node embeds and scores every microbatch; body stage ``s`` runs the microbatches
    whose route visits it.
    """
    route = np.asarray(route_MP)
    return {"io": int(route.shape[0]),
            **{f"stage{s}": int((route == s).sum()) for s in range(n_stages)}}


def _recover(method, run, clock, step, state, failed, last_metrics, n_stages):
    """Applies ``method`` to this iteration's failures; returns the state and any rollback."""
    for stage in failed:
        run.event(step, "failure", stage=int(stage))
    norms = np.ones(n_stages)  # the reference's initial norms, before any step
    if last_metrics is not None:
        norms = np.asarray(jax.device_get(last_metrics["grad_norm_body"]), np.float64)
    recovery = method.recover(step, state, failed, norms)
    for event in recovery.events:
        details = dict(event)
        run.event(step, details.pop("event"), **details)
    for kind, seconds in recovery.seconds.items():
        clock.advance(kind, seconds)
    rollback = None
    if recovery.rollback_to is not None:
        rollback = (recovery.rollback_to, recovery.data_state)
    return recovery.state, rollback


class _TrainLogger:
    """Writes training metrics and measures tokens/s between logged steps."""

    def __init__(self, run: records.RunRecord, schedule, tokens_per_step: int, start_step: int,
                 total_steps: int, progress: bool, name: str):
        self.run, self.schedule, self.tokens_per_step = run, schedule, tokens_per_step
        self.speeds: list[float] = []
        self._last = (start_step, time.perf_counter())
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not progress,
                        desc=f"train {name}", unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: dict, times: dict, val_loss: float | None) -> None:
        metrics = jax.device_get(metrics)  # waits for that step to finish
        now = time.perf_counter()
        speed = (step - self._last[0]) * self.tokens_per_step / max(now - self._last[1], 1e-9)
        self._last = (step, now)
        self.speeds.append(speed)
        loss = float(metrics["loss"])
        self.run.metrics(step, "train", {
            "loss": loss,
            "lr": float(self.schedule(step - 1)),
            "grad_norm_io": float(metrics["grad_norm_io"]),
            "grad_norm_body": [float(x) for x in metrics["grad_norm_body"]],
            "tokens": step * self.tokens_per_step,
            "tokens_per_second": speed,
            **times,
        })
        val = "-" if val_loss is None else f"{val_loss:.3f}"
        self.bar.set_postfix(loss=f"{loss:.3f}", val=val, tok_s=f"{speed:,.0f}")


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
    speed = summary.tokens_per_second
    lines.append(f"parameters: {summary.n_params:,}   median tokens/s: "
                 f"{f'{speed:,.0f}' if np.isfinite(speed) else '-'}   (losses in nats/token)")
    lines.append(f"run record: {summary.workdir}/metrics.jsonl")
    if summary.plot:
        lines.append(f"loss plot:  {summary.plot}")
    return "\n".join(lines)
