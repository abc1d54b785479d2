"""Up-front validation of a run config and the objects built from it.

Only the trainer reads configs; library code takes explicit arguments. Every check here
runs before any data is read or any array is allocated, and every error names the field
(``section.field``) and what is allowed.
"""

import numbers

import ml_collections
import optax

from decjax.data import validate_data_config
from decjax.models import LlamaConfig, StagedLlama
from decjax.optim import stage_adamw
from decjax.train.methods import validate_method_config
from decjax.train.simulation import validate_sim_config

SCHEDULES = ("constant", "warmup_cosine")
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A config field has a value that is not allowed."""


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for entry points (``app.run(main, flags_parser=parse_flags)``) with a
    one-line error, not ml_collections' traceback, for an override naming no config field."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        chain = [e]  # ml_collections: AttributeError <- KeyError(hint) <- KeyError(key)
        while chain[-1].__context__ is not None:
            chain.append(chain[-1].__context__)
        key = str(chain[-1].args[0]) if chain[-1].args else "?"
        hints = [line for x in chain for a in x.args if isinstance(a, str)
                 for line in a.splitlines() if line.startswith("Did you mean")]
        hint = hints[0] if hints else ""
        flag = next((a.split("=")[0] for a in argv[1:]
                     if a.startswith("--config.") and key in a.split("=")[0].split(".")),
                    "--config...")
        raise SystemExit(f"FATAL Flags parsing error: {flag}: the config has no field {key!r}"
                         + (f"; {hint[0].lower()}{hint[1:]}" if hint else "")) from None


def _require(condition: bool, field: str, value, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"{field}={value!r} is not allowed: {allowed}")


def _positive_int(config, field: str) -> None:
    value = _get(config, field)
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0
    _require(ok, field, value, "expected a positive integer")


def _non_negative_int(config, field: str) -> None:
    value = _get(config, field)
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0
    _require(ok, field, value, "expected an integer >= 0")


def _positive_float(config, field: str) -> None:
    value = _get(config, field)
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and value > 0
    _require(ok, field, value, "expected a number > 0")


def _get(config, field: str):
    node = config
    for part in field.split("."):
        if part not in node:
            raise ConfigError(f"{field} is missing from the config")
        node = node[part]
    return node


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`ConfigError` naming the first field with a value that is not allowed."""
    if "settle" in config:
        _validate_settle(config)
    if config.get("trainer") in ("replicated", "experts"):
        from decjax.dist import validate_dist_config
        from decjax.train import distributed, experts

        module = distributed if config.trainer == "replicated" else experts
        try:
            module.run_config(config)
            validate_dist_config(config.dist)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        return
    for field in ("model.d_model", "model.n_heads", "model.n_layers", "model.n_stages",
                  "model.seq_len", "train.steps", "train.batch_size", "train.microbatches",
                  "train.eval_every", "train.eval_batches", "ckpt.every", "ckpt.keep",
                  "log.every"):
        _positive_int(config, field)
    for field in ("model.vocab_size", "model.d_ff", "opt.warmup_steps", "seed"):
        _non_negative_int(config, field)
    for field in ("opt.lr", "opt.eps", "model.rope_theta", "model.norm_eps", "model.init_std"):
        _positive_float(config, field)
    m, t, o = config.model, config.train, config.opt
    _require(m.n_layers % m.n_stages == 0, "model.n_stages", m.n_stages,
             f"must divide model.n_layers={m.n_layers}")
    _require(m.d_model % m.n_heads == 0, "model.n_heads", m.n_heads,
             f"must divide model.d_model={m.d_model}")
    _require((m.d_model // m.n_heads) % 2 == 0, "model.n_heads", m.n_heads,
             "head dimension d_model/n_heads must be even for rotary embeddings")
    _require(m.dtype in DTYPES, "model.dtype", m.dtype, f"one of {', '.join(DTYPES)}")
    _require(t.batch_size % t.microbatches == 0, "train.microbatches", t.microbatches,
             f"must divide train.batch_size={t.batch_size}")
    _require(o.schedule in SCHEDULES, "opt.schedule", o.schedule, f"one of {', '.join(SCHEDULES)}")
    _require(0.0 <= o.min_lr_ratio <= 1.0, "opt.min_lr_ratio", o.min_lr_ratio, "in [0, 1]")
    _require(0.0 <= o.b1 < 1.0, "opt.b1", o.b1, "in [0, 1)")
    _require(0.0 <= o.b2 < 1.0, "opt.b2", o.b2, "in [0, 1)")
    _require(o.weight_decay >= 0, "opt.weight_decay", o.weight_decay, "a number >= 0")
    _require(o.clip_norm >= 0, "opt.clip_norm", o.clip_norm, "a number >= 0 (0 disables)")
    if config.log.tensorboard:
        try:
            import tensorboardX  # noqa: F401
        except ImportError as e:
            raise ConfigError(
                "log.tensorboard=True needs tensorboardX: pip install 'decjax[tensorboard]'"
            ) from e
    try:
        validate_data_config(config.data)
        validate_sim_config(config.sim)
        validate_method_config(config.method, config.sim.failures, config.model.n_stages,
                               config.sim.replicas)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _validate_settle(config: ml_collections.ConfigDict) -> None:
    """``settle``: the options of :func:`decjax.payments.settle.settle` for paying the run's
    nodes after training; only the pipeline trainer records per-node work."""
    from decjax.payments.settle import check_options

    trainer = config.get("trainer", "loop")
    if trainer != "loop":
        raise ConfigError(f"settle is not allowed with trainer={trainer!r}: only trainer='loop' "
                          "(a pipeline run) records the per-node work to settle")
    try:
        check_options(**config.settle)
    except (TypeError, ValueError) as e:  # TypeError: a field check_options does not take
        raise ConfigError(f"settle: {e}") from e


def make_model(config: ml_collections.ConfigDict, vocab_size: int) -> StagedLlama:
    """The staged model of ``config.model``; ``vocab_size`` is used when the config says 0."""
    m = config.model
    llama = LlamaConfig(
        vocab_size=m.vocab_size or vocab_size,
        d_model=m.d_model,
        n_heads=m.n_heads,
        n_layers=m.n_layers,
        d_ff=m.d_ff,
        rope_theta=m.rope_theta,
        norm_eps=m.norm_eps,
        init_std=m.init_std,
        dtype=m.dtype,
    )
    # SkipPipe's routes skip every microbatch's stages: branch past them rather than mask.
    return StagedLlama(llama, m.n_stages,
                       skip_by_branching=config.get("method", {}).get("name") == "skippipe")


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    o = config.opt
    if o.schedule == "constant":
        return optax.constant_schedule(o.lr)
    warmup = min(o.warmup_steps, config.train.steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=o.lr,
        warmup_steps=warmup,
        decay_steps=max(config.train.steps, warmup + 1),
        end_value=o.lr * o.min_lr_ratio,
    )


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    o = config.opt
    return stage_adamw(
        make_schedule(config),
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        weight_decay=o.weight_decay,
        clip_norm=o.clip_norm or None,
    )
