"""Run any config (every trainer), and sweeps of configs that reuse finished runs.

    python -m decjax.train.sweep --config=configs/checkfree.py:size=tiny \
        --grid="method=checkpoint,checkfree_plus;rate=0.1,0.33" --out=runs/cf-sweep

A sweep is a set of named configs, each trained in ``<out>/<name>``. A run whose record ends
with an ``end`` event is reused if its stored ``config.json`` equals the config asked for;
if it differs, the sweep stops naming the run and the first differing fields (a finished
result is never overwritten). Unfinished runs resume (the base trainer) from their latest
checkpoint. Experiment scripts build their grids of configs and call :func:`sweep`.
"""

import itertools
import json
import pathlib
from collections.abc import Callable, Mapping

import ml_collections
from absl import app, flags, logging
from tqdm.auto import tqdm

from decjax.train.records import read_jsonl

TRAINERS = ("loop", "replicated", "experts")


def train_config(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> None:
    """Trains ``config`` in ``workdir`` with the trainer it names (``config.trainer``; the base
    loop if it names none): what ``python -m decjax.train`` does."""
    trainer = config.get("trainer", "loop")
    if trainer not in TRAINERS:
        raise ValueError(f"trainer={trainer!r} is not allowed: one of {', '.join(TRAINERS)}")
    if trainer == "loop":
        from decjax.train.loop import train_and_evaluate

        train_and_evaluate(config, workdir)
        if "settle" in config:  # derived from events.jsonl alone, so recomputed every time
            from decjax.payments.settle import SETTLEMENT_FILE, settle_run

            result = settle_run(workdir, overwrite=True, **config.settle)
            print(f"{result.summary()}\nwrote {pathlib.Path(workdir) / SETTLEMENT_FILE}")
        return
    from decjax.train import distributed, experts

    module = distributed if trainer == "replicated" else experts
    module.train(module.run_config(config), config.dist, workdir,
                 config_json=config.to_json(sort_keys=True))


def finished(workdir: str | pathlib.Path) -> bool:
    """Whether ``workdir`` holds a run that reached its last step."""
    events = read_jsonl(pathlib.Path(workdir) / "events.jsonl")
    return bool(events) and events[-1]["event"] == "end"


def config_changes(stored: dict, wanted: dict, prefix: str = "") -> list[str]:
    """``["section.field: stored -> wanted", ...]`` where two config dicts differ."""
    changes = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key, "<absent>"), wanted.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


class SweepRefused(ValueError):
    """A sweep would overwrite a finished run of another config."""


def sweep_or_exit(configs: Mapping[str, ml_collections.ConfigDict], out: str | pathlib.Path,
                  **options) -> dict[str, pathlib.Path]:
    """:func:`sweep` for scripts: an invalid config or a refused sweep exits with its one-line
    message instead of a traceback (errors during training still raise)."""
    from decjax.train.config import ConfigError

    try:
        return sweep(configs, out, **options)
    except (ConfigError, SweepRefused) as e:
        raise SystemExit(f"error: {e}") from None


def sweep(configs: Mapping[str, ml_collections.ConfigDict], out: str | pathlib.Path, *,
          train: Callable = train_config, progress: bool = True) -> dict[str, pathlib.Path]:
    """Trains every config not already finished in ``<out>/<name>``; returns the workdirs.

    Raises:
      ConfigError: a config is not valid (before anything is trained).
      SweepRefused: a finished run in ``<out>/<name>`` was trained with a different config
        (before anything is trained).
    """
    from decjax.train.config import validate

    out = pathlib.Path(out)
    workdirs = {name: out / name for name in configs}
    todo = []
    for name, config in configs.items():
        validate(config)  # every config, before the first run starts
        if not finished(workdirs[name]):
            todo.append(name)
            continue
        stored = json.loads((workdirs[name] / "config.json").read_text())
        changes = config_changes(stored, json.loads(config.to_json_best_effort()))
        if changes:
            raise SweepRefused(
                f"{workdirs[name]} holds a finished run of another config ("
                f"{'; '.join(changes[:3])}{' ...' if len(changes) > 3 else ''}): delete it or "
                "choose another --out")
    for name in tqdm(todo, desc="sweep", disable=not progress or not todo, leave=False):
        train(configs[name], workdirs[name])
        tqdm.write(f"done {name}")
    return workdirs


def grid_configs(config_file: str, variant: str, grid: str,
                 load: Callable[[str, str], ml_collections.ConfigDict] | None = None
                 ) -> dict[str, ml_collections.ConfigDict]:
    """``{run name: config}`` for every combination of ``grid`` ("k=a,b;k2=c") on top of the
    config file's ``variant`` ("k=v,..."); names join the grid's ``k=v`` with ``-``."""
    axes = []
    for part in filter(None, grid.split(";")):
        key, sep, values = part.partition("=")
        if not sep or not values:
            raise ValueError(f"--grid part {part!r}: expected key=value1,value2,...")
        axes.append([(key.strip(), v.strip()) for v in values.split(",")])
    load = load or _load_config
    configs = {}
    for combination in itertools.product(*axes):
        arg = ",".join(filter(None, [variant, *(f"{k}={v}" for k, v in combination)]))
        name = "-".join(f"{k}={v}" for k, v in combination) or "run"
        configs[name] = load(config_file, arg)
    return configs


def _load_config(config_file: str, arg: str) -> ml_collections.ConfigDict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("decjax_sweep_config", config_file)
    if spec is None or not pathlib.Path(config_file).is_file():
        raise ValueError(f"--config={config_file!r} is not a config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)


def main(argv, config_flag: str, grid_flag: str, out_flag: str) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    config_file, _, variant = config_flag.partition(":")
    try:
        workdirs = sweep(grid_configs(config_file, variant, grid_flag), out_flag)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    for name, workdir in workdirs.items():
        val = [r["loss"] for r in read_jsonl(workdir / "metrics.jsonl")
               if r["split"] == "val" and "loss" in r]
        print(f"{name}: final val loss {val[-1]:.4f}  ({workdir})" if val else f"{name}: -")


if __name__ == "__main__":  # flags only here: importing the library defines none
    _CONFIG = flags.DEFINE_string("config", None, "Config file and variant: x.py:k=v,...")
    _GRID = flags.DEFINE_string("grid", "", "Variant values to sweep: 'k=a,b;k2=c,d'.")
    _OUT = flags.DEFINE_string("out", None, "Folder of the runs, one sub-folder per run.")
    flags.mark_flags_as_required(["config", "out"])
    app.run(lambda argv: main(argv, _CONFIG.value, _GRID.value, _OUT.value))
