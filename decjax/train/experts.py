"""HDEE domain experts as a config run, alone or over real processes, surviving kill -9.

    python -m decjax.train --config=configs/hdee.py:size=tiny --workdir=runs/hdee-tiny
    python -m decjax.launch --processes=3 -- python -m decjax.train \\
        --config=configs/hdee.py:size=tiny --workdir=runs/hdee-3p

One of HDEE's three compute-matched ensembles (:func:`decjax.ensemble.hdee_ensembles`):
one expert per (domains, difficulty) group, all experts zero-padded to the widest and trained
by the step of :mod:`decjax.ensemble.train` under ``jax.shard_map`` over a mesh axis
``"expert"`` that spans the group's devices (every device holds ``experts / devices`` of
them). Nothing crosses that axis during training: the only collectives gather the per-expert
losses to process 0, which alone writes the run record. Experts start from independent
initialisations (the experiment script ``experiments/hdee/run.py`` adds the seed-model phase).

When a process dies, its experts die with it: no peer holds their state, so they are not
rebuilt. The survivors log a ``failure`` event naming the lost experts, the steps each had
taken of its budget and the compute spent on them (``6 N T`` FLOPs), re-form the mesh over the
live devices and finish the others. ``result.json`` accounts the whole budget: spent on
finished experts, spent on lost ones, and never spent; and it scores each training domain with
its own expert, or, for a lost expert's domains, with the best survivor.
"""

import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental.multihost_utils import ProcessFailureError
from tqdm.auto import tqdm

from decjax.data import default_data_config, load_data
from decjax.dist import Group, state
from decjax.ensemble import (
    AXIS,
    ENSEMBLE_NAMES,
    ExpertState,
    adam_direction,
    cosine_lr,
    domain_corpus,
    expert_compute,
    expert_streams,
    group_by_shape,
    group_params,
    hdee_ensembles,
    init_expert_state,
    make_expert_eval,
    make_expert_train_step,
)
from decjax.ensemble.train import _eval_sets
from decjax.models.llama import LlamaConfig
from decjax.models.staged import StagedLlama
from decjax.train import records
from decjax.train.distributed import run_in_group


@dataclasses.dataclass(frozen=True)
class ExpertsConfig:
    """One ensemble of ``trainer='experts'`` (``configs/hdee.py``).

    Attributes:
      ensemble: one of :data:`decjax.ensemble.ENSEMBLE_NAMES`.
      domains: one entry per expert: its training domains joined by ``+`` (synthetic specs).
      difficulties: each entry's difficulty group (easy, moderate, hard).
      d_ff: SwiGLU widths (small, medium, large); ``small + large = 2 medium``.
      steps: step budgets (easy, moderate, hard); ``easy + hard = 2 moderate``.
    """

    ensemble: str = "M_He-I_Ho"
    domains: tuple[str, ...] = ("markov3_v4_a0.2", "markov2_v8", "markov2_v16")
    difficulties: tuple[str, ...] = ("easy", "moderate", "hard")
    d_ff: tuple[int, ...] = (128, 192, 256)
    steps: tuple[int, ...] = (320, 480, 640)
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    seq_len: int = 64
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 20
    eval_every: int = 80
    eval_rows: int = 32
    docs_per_domain: int = 32
    doc_len: int = 4096
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.ensemble not in ENSEMBLE_NAMES:
            raise ValueError(f"run.ensemble={self.ensemble!r} is not allowed: one of "
                             f"{', '.join(ENSEMBLE_NAMES)}")
        if len(self.domains) != len(self.difficulties):
            raise ValueError(f"run.domains has {len(self.domains)} entries but "
                             f"run.difficulties has {len(self.difficulties)}: one per expert")
        for field in ("batch_size", "eval_rows", "docs_per_domain", "doc_len", "seq_len"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"run.{field}={value!r} is not allowed: an integer >= 1")
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ValueError(f"run.eval_every={self.eval_every!r} is not allowed: an integer "
                             ">= 0 (0: only at the start and at each expert's end)")

    @property
    def groups(self) -> list[tuple[tuple[str, ...], str]]:
        return [(tuple(d.split("+")), diff)
                for d, diff in zip(self.domains, self.difficulties, strict=True)]

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


def run_config(config: ml_collections.ConfigDict) -> ExpertsConfig:
    """The :class:`ExpertsConfig` of a ``trainer='experts'`` config file."""
    fields = config.run.to_dict()
    try:
        return ExpertsConfig(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in fields.items()})
    except TypeError as e:  # an unknown field
        raise ValueError(f"config.run: {e}; fields are those of ExpertsConfig") from None


def load_corpus(config: ExpertsConfig):
    """The synthetic domains of ``config``, one corpus (byte tokenizer)."""
    data = default_data_config()
    data.update(source="synthetic", seed=config.seed, val_fraction=0.25,
                synthetic_domains=tuple(d for ds, _ in config.groups for d in ds),
                synthetic_docs_per_domain=config.docs_per_domain,
                synthetic_doc_len=config.doc_len)
    loaded = load_data(data, seq_len=config.seq_len)
    return domain_corpus(loaded), loaded.tokenizer.vocab_size


def ensemble_specs(config: ExpertsConfig, vocab_size: int):
    """The chosen ensemble's experts, in one padded group (budgets checked equal)."""
    base = LlamaConfig(vocab_size=vocab_size, d_model=config.d_model, n_heads=config.n_heads,
                       n_layers=config.n_layers)
    specs = hdee_ensembles(base, config.groups, d_ff=config.d_ff,
                           steps=config.steps)[config.ensemble]
    return group_by_shape(specs, max_pad_ratio=float("inf"))[0]


def train(config: ExpertsConfig, dist_settings: ml_collections.ConfigDict,
          workdir: str | pathlib.Path, *, config_json: str = "") -> dict | None:
    """Trains ``config``'s ensemble as one member of the process group; process 0 returns the
    result (also written to ``<workdir>/result.json``), the others ``None``."""
    return run_in_group(_ExpertTrainer, config, dist_settings, workdir, config_json)


@dataclasses.dataclass
class _Layout:
    """The mesh and which expert (index into the group's specs) sits at each slot."""

    devices: list
    experts: list[int]

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return jax.sharding.Mesh(np.array(self.devices), (AXIS,))

    @property
    def per_device(self) -> int:
        return len(self.experts) // len(self.devices)

    def local(self, process_id: int) -> list[int]:
        k = self.per_device
        return [e for i, e in enumerate(self.experts) if self.devices[i // k].process_index
                == process_id]


class _ExpertTrainer:
    def __init__(self, config: ExpertsConfig, group: Group, workdir: pathlib.Path):
        if group.joined_with is not None:
            raise ValueError("a replacement cannot join an experts run: a lost expert has no "
                             "live copy to start from (run with dist.join_check_every=0)")
        self.config, self.group = config, group
        self.corpus, vocab_size = load_corpus(config)
        self.experts = ensemble_specs(config, vocab_size)
        self.specs = self.experts.specs
        self.model = StagedLlama(self.experts.config, n_stages=1)
        self.tx = adam_direction()
        self.schedule = cosine_lr(config.lr, warmup_steps=config.warmup_steps)
        self.streams = {}
        self.eval_sets = _eval_sets(self.corpus, None, config.eval_rows, config.batch_size)
        self.record = records.RunRecord(workdir) if group.is_leader else None
        if self.record is not None:
            self.record.write_config(group.config_json)
        self.workdir = workdir
        self.lost: dict[str, dict] = {}

    def event(self, step: int, name: str, **details) -> None:
        if self.record is not None:
            self.record.event(step, name, **details)

    def _programs(self, layout: _Layout):
        mesh = layout.mesh
        gather = jax.jit(lambda x: x, out_shardings=jax.NamedSharding(mesh, jax.P()))
        step = make_expert_train_step(self.model, self.tx, self.schedule, mesh=mesh,
                                      donate=False)  # a failed step must leave its input
        return step, make_expert_eval(self.model, mesh), gather

    def _initial_state(self, layout: _Layout) -> ExpertState:
        params = group_params(self.experts, key=jax.random.key(self.config.seed))
        full = init_expert_state(params, self.tx, total_steps=[s.steps for s in self.specs],
                                 d_ff=[s.d_ff for s in self.specs])
        mine = layout.local(self.group.process_id)
        local = jax.tree.map(lambda x: np.asarray(x)[mine], full)
        return state.to_mesh(local, layout.mesh, AXIS)

    def _rows(self, layout: _Layout, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's experts' rows of ``step`` (0-based) and their active flags."""
        rows, active = [], []
        for e in layout.local(self.group.process_id):
            spec = self.specs[e]
            if spec.name not in self.streams:
                self.streams[spec.name] = expert_streams(
                    self.corpus, {spec.name: spec.domains}, batch_size=self.config.batch_size,
                    seed=self.config.seed)[spec.name]
            on = step < spec.steps
            rows.append(self.streams[spec.name].next() if on else
                        np.zeros((self.config.batch_size, self.corpus.row_len), np.int32))
            active.append(on)
        return np.stack(rows), np.array(active)

    def run(self) -> dict | None:
        c, group = self.config, self.group
        layout = _Layout(self._devices(), list(range(len(self.specs))))
        programs = self._programs(layout)
        expert_state = self._initial_state(layout)
        n_steps = max(s.steps for s in self.specs)
        self.event(0, "start", processes=len({d.process_index for d in layout.devices}),
                   experts=[s.name for s in self.specs], devices=len(layout.devices),
                   budget_flops=self._flops(self.specs))
        with group.live():
            self._record_eval(0, self._evaluate(programs, layout, expert_state))
        bar = tqdm(total=n_steps, disable=not (c.progress and group.is_leader), leave=False,
                   desc=f"{c.ensemble} x{len(self.specs)} experts")
        step, rows = 0, None
        while step < n_steps:
            if rows is None:
                rows = self._rows(layout, step)
            began = time.perf_counter()
            try:
                with group.live():
                    local_rows, local_active = rows
                    new_state, metrics = programs[0](
                        expert_state, state.to_mesh(local_rows, layout.mesh, AXIS),
                        state.to_mesh(local_active, layout.mesh, AXIS))
                    loss, active = (np.asarray(programs[2](metrics[k]).addressable_data(0))
                                    for k in ("loss", "active"))
                    seconds = time.perf_counter() - began
                    evaluation = (self._evaluate(programs, layout, new_state)
                                  if step + 1 in self._eval_steps(layout) else None)
            except (ProcessFailureError, jax.errors.JaxRuntimeError):
                if not group.distributed:
                    raise
                layout, programs, expert_state = self._shrink(layout, expert_state, step,
                                                              began)
                rows = None
                for e in layout.local(group.process_id):  # re-read this step's rows
                    spec = self.specs[e]
                    self.streams[spec.name].set_state(
                        {"rows_served": min(step, spec.steps) * c.batch_size})
                continue
            expert_state, step, rows = new_state, step + 1, None
            self._log_train(layout, step, loss, active, seconds)
            if evaluation is not None:
                self._record_eval(step, evaluation)
            bar.update(1)
        bar.close()
        return self._finish(layout)

    def _devices(self) -> list:
        """The group's devices; alone, as many of this process's as divide the experts."""
        devices, n = self.group.devices, len(self.specs)
        if not self.group.distributed:
            return devices[:max(k for k in range(1, len(devices) + 1) if n % k == 0)]
        if n % len(devices):
            raise ValueError(
                f"{n} experts over {len(devices)} devices: the device count (processes x "
                "devices per process) must divide the number of experts")
        return devices

    def _eval_steps(self, layout: _Layout) -> set[int]:
        ends = {self.specs[e].steps for e in layout.experts}
        every = self.config.eval_every
        return ends | (set(range(every, max(ends) + 1, every)) if every else set())

    def _log_train(self, layout, step, loss, active, seconds) -> None:
        if self.record is None:
            return
        names = [self.specs[e].name for e in layout.experts]
        losses = {n: float(v) for n, v, a in zip(names, loss, active, strict=True) if a}
        self.record.metrics(step, "train", {"loss": float(np.mean(list(losses.values()))),
                                            "loss_experts": losses, "experts": len(names),
                                            "step_seconds": seconds})

    def _evaluate(self, programs, layout, expert_state) -> dict:
        """``{expert: {domain: val loss}}`` of the experts on the mesh."""
        _, evaluate, gather = programs
        names = [self.specs[e].name for e in layout.experts]
        losses = {n: {} for n in names}
        for domain, rows in self.eval_sets.items():
            loss_sum, n_tokens = (np.asarray(gather(x).addressable_data(0))
                                  for x in evaluate(expert_state.params, jnp.asarray(rows)))
            for n, total, count in zip(names, loss_sum, n_tokens, strict=True):
                losses[n][domain] = float(total / count)
        return losses

    def _record_eval(self, step: int, losses: dict) -> None:
        if self.record is not None:
            self.record.metrics(step, "val", {"loss_experts": losses,
                                              "loss": _mean_loss(self._domain_losses(losses))})

    def _domain_losses(self, losses: dict) -> dict:
        """Each training domain scored by its own expert, or by the best survivor if lost."""
        out = {}
        for spec in self.specs:
            for d in spec.domains:
                scorer = (spec.name if spec.name in losses
                          else min(losses, key=lambda n: losses[n][d]))
                out[d] = {"expert": scorer, "loss": losses[scorer][d]}
        return out

    def _flops(self, specs, steps=None) -> int:
        tokens = self.config.tokens_per_step
        if steps is None:
            return sum(expert_compute(s, tokens) for s in specs)
        return sum(expert_compute(dataclasses.replace(s, steps=t), tokens) if t else 0
                   for s, t in zip(specs, steps, strict=True))

    def _shrink(self, layout: _Layout, expert_state, step: int, began: float):
        host = state.to_host(expert_state)  # this process's experts, before the failed step
        lost_processes = self.group.shrink()
        detected = time.perf_counter() - began
        if not lost_processes:
            raise RuntimeError(f"step {step + 1} failed but every process is alive")
        k = layout.per_device
        kept = [e for i, e in enumerate(layout.experts) if layout.devices[i // k]
                in self.group.devices]
        lost = [self.specs[e] for e in layout.experts if e not in kept]
        done = [min(step, s.steps) for s in lost]
        for spec, steps in zip(lost, done, strict=True):
            self.lost[spec.name] = {"step": step, "steps_done": steps}
        self.event(step, "failure", processes=sorted(lost_processes),
                   experts=[s.name for s in lost], steps_done=done,
                   budget_steps=[s.steps for s in lost], spent_flops=self._flops(lost, done),
                   lost_flops=self._flops(lost) - self._flops(lost, done),
                   detect_seconds=detected)
        layout = _Layout(self.group.devices, kept)
        programs = self._programs(layout)
        expert_state = state.to_mesh(host, layout.mesh, AXIS)
        self.event(step, "regroup", experts=[self.specs[e].name for e in kept],
                   devices=len(layout.devices))
        return layout, programs, expert_state

    def _finish(self, layout: _Layout) -> dict | None:
        if self.record is None:
            return None
        val = [r for r in records.read_jsonl(self.record.metrics_path) if r["split"] == "val"]
        final = val[-1]["loss_experts"]
        experts = {}
        for s in self.specs:
            lost = self.lost.get(s.name)
            experts[s.name] = dict(d_ff=s.d_ff, domains=list(s.domains), budget_steps=s.steps,
                                   steps_done=lost["steps_done"] if lost else s.steps,
                                   status=f"lost at step {lost['step']}" if lost else "finished",
                                   val_loss=final.get(s.name))
        finished = [s for s in self.specs if s.name not in self.lost]
        lost_specs = [s for s in self.specs if s.name in self.lost]
        lost_done = [self.lost[s.name]["steps_done"] for s in lost_specs]
        budget = dict(planned_flops=self._flops(self.specs),
                      finished_flops=self._flops(finished),
                      lost_spent_flops=self._flops(lost_specs, lost_done),
                      never_spent_flops=self._flops(lost_specs) - self._flops(lost_specs,
                                                                              lost_done))
        domain_loss = self._domain_losses(final)
        result = dict(config=dataclasses.asdict(self.config),
                      processes=len({d.process_index for d in layout.devices}),
                      experts=experts, budget=budget, domain_val_loss=domain_loss,
                      val_loss=_mean_loss(domain_loss),
                      eval_steps=[r["step"] for r in val],
                      val_loss_curve=[r["loss"] for r in val])
        records.write_atomically(self.workdir / "result.json", json.dumps(result))
        self.event(max(s.steps for s in self.specs), "end", val_loss=result["val_loss"],
                   lost=sorted(self.lost))
        self.record.close()
        return result


def _mean_loss(domain_losses: dict) -> float:
    return float(np.mean([v["loss"] for v in domain_losses.values()]))
