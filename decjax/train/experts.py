"""HDEE domain experts as a config run, alone or over real processes, surviving kill -9.

    python -m decjax.train --config=configs/hdee.py:size=tiny --workdir=runs/hdee-tiny
    python -m decjax.launch --processes=3 -- python -m decjax.train \\
        --config=configs/hdee.py:size=tiny --workdir=runs/hdee-3p

One of HDEE's three compute-matched ensembles (:func:`decjax.ensemble.hdee_ensembles`):
one expert per (domains, difficulty) group, all experts zero-padded to the widest and trained
by the step of :mod:`decjax.ensemble.train` under ``jax.shard_map`` over a mesh axis
``"expert"`` that spans the group's devices (every device holds ``experts / devices`` of
them). Nothing crosses that axis during training: the only collectives gather the per-expert
losses to process 0, which alone writes the run record. Two more kinds of run complete an
HDEE iteration (§2.3-2.5): ``ensemble="seed"`` trains one seed model per width on every
training domain, and ``ensemble="dense"`` one model of the medium width with the ensembles'
compute. Experts (and the dense model) start from independent initialisations, or, with
``init_from`` naming a finished seed run, as copies of its seed model of their width (BTM's
branching). A finished run stores its models in ``params.msgpack`` and scores every domain,
held-out ones included, on test rows: each model alone and, for an ensemble, each mixture
mode under BTM's cached prior from validation rows (:func:`decjax.ensemble.mixture.score_domains`).

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
from flax import serialization
from jax.experimental.multihost_utils import ProcessFailureError
from tqdm.auto import tqdm

from decjax.data import default_data_config, load_data
from decjax.dist import Group, state
from decjax.ensemble import (
    AXIS,
    ENSEMBLE_NAMES,
    DomainCorpus,
    ExpertState,
    adam_direction,
    assign_domains,
    cosine_lr,
    dense_reference,
    domain_corpus,
    expert_compute,
    expert_streams,
    group_by_shape,
    group_params,
    hdee_ensembles,
    init_expert_state,
    make_expert_eval,
    make_expert_train_step,
    mixture,
    unpad_d_ff,
)
from decjax.ensemble.experts import ExpertSpec
from decjax.ensemble.train import _eval_sets
from decjax.models.llama import LlamaConfig
from decjax.models.staged import StagedLlama
from decjax.train import records
from decjax.train.distributed import run_in_group


@dataclasses.dataclass(frozen=True)
class ExpertsConfig:
    """One ensemble of ``trainer='experts'`` (``configs/hdee.py``).

    Attributes:
      ensemble: one of :data:`RUN_KINDS`: an ensemble of
        :data:`decjax.ensemble.ENSEMBLE_NAMES`, ``"seed"`` (one seed model per width on
        every training domain, ``seed_steps`` each) or ``"dense"`` (one medium model on every
        training domain with an ensemble's compute).
      domains: one entry per expert: its training domains joined by ``+``; a domain is a
        synthetic spec (``markov2_v8``) or a package of the Python standard library
        (``asyncio``, its first files up to ``stdlib_bytes``).
      difficulties: each entry's difficulty group (easy, moderate, hard).
      held_out: domains never trained on, scored at the end.
      d_ff: SwiGLU widths (small, medium, large); ``small + large = 2 medium``.
      steps: step budgets (easy, moderate, hard); ``easy + hard = 2 moderate``.
      init_from: a finished ``ensemble="seed"`` run's workdir to branch from ("": independent
        initialisations).
      data_seed: the domains' train/val split and Markov chains (``seed``: initialisation and
        data order only).
      test_rows, prior_rows, prior_decay: the final scoring (test rows per domain; BTM's
        cached prior on the first ``prior_rows`` validation rows, EWM factor ``prior_decay``).
    """

    ensemble: str = "M_He-I_Ho"
    domains: tuple[str, ...] = ("markov3_v4_a0.2", "markov2_v8", "markov2_v16")
    difficulties: tuple[str, ...] = ("easy", "moderate", "hard")
    held_out: tuple[str, ...] = ()
    d_ff: tuple[int, ...] = (128, 192, 256)
    steps: tuple[int, ...] = (320, 480, 640)
    seed_steps: int = 600
    init_from: str = ""
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
    stdlib_bytes: int = 160_000
    data_seed: int = 0
    test_rows: int = 256
    prior_rows: int = 100
    prior_decay: float = 0.3
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.ensemble not in RUN_KINDS:
            raise ValueError(f"run.ensemble={self.ensemble!r} is not allowed: one of "
                             f"{', '.join(RUN_KINDS)}")
        if len(self.domains) != len(self.difficulties):
            raise ValueError(f"run.domains has {len(self.domains)} entries but "
                             f"run.difficulties has {len(self.difficulties)}: one per expert")
        if self.ensemble == "seed" and self.init_from:
            raise ValueError(f"run.init_from={self.init_from!r} is not allowed with "
                             "run.ensemble='seed': seed models start from scratch")
        if not 0 < self.prior_decay <= 1:
            raise ValueError(f"run.prior_decay={self.prior_decay!r} is not allowed: in (0, 1]")
        for field in ("batch_size", "eval_rows", "docs_per_domain", "doc_len", "seq_len",
                      "seed_steps", "stdlib_bytes", "test_rows", "prior_rows"):
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
    def training_domains(self) -> tuple[str, ...]:
        return tuple(d for ds, _ in self.groups for d in ds)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


RUN_KINDS = (*ENSEMBLE_NAMES, "seed", "dense")
SEED_SIZES = ("S", "M", "L")  # the seed models' names: seed_S, seed_M, seed_L
PARAMS_FILE = "params.msgpack"  # {model name: its unpadded params}, next to result.json


def run_config(config: ml_collections.ConfigDict) -> ExpertsConfig:
    """The :class:`ExpertsConfig` of a ``trainer='experts'`` config file."""
    fields = config.run.to_dict()
    try:
        return ExpertsConfig(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in fields.items()})
    except TypeError as e:  # an unknown field
        raise ValueError(f"config.run: {e}; fields are those of ExpertsConfig") from None


def is_synthetic(domain: str) -> bool:
    """Whether ``domain`` names a synthetic Markov source (else a standard-library package)."""
    return domain.startswith(("markov", "iid_"))


def load_corpus(config: ExpertsConfig):
    """``(corpus, vocab_size, entropy_rates)``: every training and held-out domain of
    ``config`` in one corpus (byte tokenizer), each domain split 75/25 into train and val
    (whole documents) and its val rows halved into val and test; the Markov domains' entropy
    rates (nats per byte)."""
    names = config.training_domains + tuple(config.held_out)
    sources = {"synthetic": dict(synthetic_domains=tuple(filter(is_synthetic, names)),
                                 synthetic_docs_per_domain=config.docs_per_domain,
                                 synthetic_doc_len=config.doc_len),
               "pystdlib": dict(domains=tuple(d for d in names if not is_synthetic(d)),
                                max_bytes_per_domain=config.stdlib_bytes)}
    rows, rates, vocab = {split: {} for split in ("train", "val", "test")}, {}, set()
    for source, fields in sources.items():
        if not next(iter(fields.values())):  # no domain of this source
            continue
        data = default_data_config()
        data.update(source=source, seed=config.data_seed, val_fraction=0.25, **fields)
        loaded = load_data(data, seq_len=config.seq_len)
        rates.update(loaded.entropy_rate or {})
        vocab.add(loaded.tokenizer.vocab_size)
        for split, by_domain in domain_corpus(loaded).rows.items():
            rows[split].update(by_domain)
    corpus = DomainCorpus(domains=names, rows={s: {d: r[d] for d in names}
                                               for s, r in rows.items()})
    assign_domains(corpus, {"+".join(ds): ds for ds, _ in config.groups},
                   held_out=config.held_out)
    (vocab_size,) = vocab  # both sources use the byte tokenizer
    return corpus, vocab_size, rates


def ensemble_specs(config: ExpertsConfig, vocab_size: int):
    """The run's models, in one padded group (the ensembles' budgets checked equal)."""
    base = LlamaConfig(vocab_size=vocab_size, d_model=config.d_model, n_heads=config.n_heads,
                       n_layers=config.n_layers)
    ensembles = hdee_ensembles(base, config.groups, d_ff=config.d_ff, steps=config.steps)
    if config.ensemble == "seed":
        specs = [ExpertSpec(f"seed_{size}", config.training_domains, d_ff, config.seed_steps,
                            base) for size, d_ff in zip(SEED_SIZES, config.d_ff, strict=True)]
    elif config.ensemble == "dense":
        specs = [dense_reference(base, d_ff=config.d_ff[1], domains=config.training_domains,
                                 ensemble=ensembles["M_Ho-I_Ho"])]
    else:
        specs = ensembles[config.ensemble]
    return group_by_shape(specs, max_pad_ratio=float("inf"))[0]


def load_models(workdir: str | pathlib.Path) -> dict:
    """``{model name: params}`` of a finished experts run (unpadded, numpy)."""
    path = pathlib.Path(workdir) / PARAMS_FILE
    if not path.exists():
        raise ValueError(f"run.init_from={str(workdir)!r} holds no {PARAMS_FILE}: name the "
                         "workdir of a finished run.ensemble='seed' run")
    return serialization.msgpack_restore(path.read_bytes())


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
        self.started = time.perf_counter()
        self.corpus, vocab_size, _ = load_corpus(config)
        self.experts = ensemble_specs(config, vocab_size)
        self.specs = self.experts.specs
        self.seeds = self._seed_models(config.init_from)
        self.model = StagedLlama(self.experts.config, n_stages=1)
        self.tx = adam_direction()
        self.schedule = cosine_lr(config.lr, warmup_steps=config.warmup_steps)
        self.streams = {}
        self.eval_sets = _eval_sets(self.corpus, config.training_domains, config.eval_rows,
                                    config.batch_size)
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

    def _seed_models(self, init_from: str) -> dict | None:
        """``{d_ff: params}`` of the seed run to branch from (``None``: no ``init_from``)."""
        if not init_from:
            return None
        models = load_models(init_from)
        stored = json.loads((pathlib.Path(init_from) / "result.json").read_text())["experts"]
        seeds = {stored[name]["d_ff"]: params for name, params in models.items()}
        missing = sorted({s.d_ff for s in self.specs} - set(seeds))
        if missing:
            raise ValueError(f"run.init_from={init_from!r} has no seed model of d_ff {missing} "
                             f"(it has {sorted(seeds)})")
        return seeds

    def _initial_state(self, layout: _Layout) -> ExpertState:
        params = group_params(self.experts, key=jax.random.key(self.config.seed),
                              seeds=self.seeds)
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
            except (ProcessFailureError, jax.errors.JaxRuntimeError) as failure:
                if not group.distributed:
                    raise
                layout, programs, expert_state = self._shrink(layout, expert_state, step,
                                                              began, failure)
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
        return self._finish(layout, expert_state)

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
        """Each training domain scored by the best live model trained on it, or by the best
        survivor if every such model is lost."""
        out = {}
        for d in self.config.training_domains:
            own = [s.name for s in self.specs if d in s.domains and s.name in losses]
            scorer = min(own or losses, key=lambda n: losses[n][d])
            out[d] = {"expert": scorer, "loss": losses[scorer][d]}
        return out

    def _flops(self, specs, steps=None) -> int:
        tokens = self.config.tokens_per_step
        if steps is None:
            return sum(expert_compute(s, tokens) for s in specs)
        return sum(expert_compute(dataclasses.replace(s, steps=t), tokens) if t else 0
                   for s, t in zip(specs, steps, strict=True))

    def _shrink(self, layout: _Layout, expert_state, step: int, began: float, failure):
        host = state.to_host(expert_state)  # this process's experts, before the failed step
        lost_processes = self.group.shrink()
        detected = time.perf_counter() - began
        if not lost_processes:
            raise RuntimeError(f"step {step + 1} failed but every process is alive: "
                               f"{failure}") from failure
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

    def _save_and_score(self, layout: _Layout, expert_state) -> dict:
        """Writes the live models to :data:`PARAMS_FILE` and scores every domain on its test
        rows (process 0; the gather runs on every process)."""
        gather = self._programs(layout)[2]
        params_E = jax.tree.map(lambda x: np.asarray(gather(x).addressable_data(0)),
                                expert_state.params)
        if self.record is None:
            return {}
        names = [self.specs[e].name for e in layout.experts]
        models = {n: unpad_d_ff(jax.tree.map(lambda x, i=i: x[i], params_E), self.specs[e].d_ff)
                  for i, (n, e) in enumerate(zip(names, layout.experts, strict=True))}
        records.write_atomically(self.workdir / PARAMS_FILE,
                                 serialization.msgpack_serialize(models))
        c = self.config
        return mixture.score_domains(
            self.experts.config, params_E, names, self.corpus,
            c.training_domains + tuple(c.held_out), test_rows=c.test_rows,
            prior_rows=c.prior_rows, prior_decay=c.prior_decay,
            mixtures=c.ensemble in ENSEMBLE_NAMES and len(names) > 1)

    def _finish(self, layout: _Layout, expert_state) -> dict | None:
        test = self._save_and_score(layout, expert_state)
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
                      padded_d_ff=self.experts.config.d_ff, experts=experts, budget=budget,
                      domain_val_loss=domain_loss, val_loss=_mean_loss(domain_loss), test=test,
                      wall_seconds=time.perf_counter() - self.started,
                      eval_steps=[r["step"] for r in val],
                      val_loss_curve=[r["loss"] for r in val])
        records.write_atomically(self.workdir / "result.json", json.dumps(result))
        self.event(max(s.steps for s in self.specs), "end", val_loss=result["val_loss"],
                   lost=sorted(self.lost))
        self.record.close()
        return result


def _mean_loss(domain_losses: dict) -> float:
    return float(np.mean([v["loss"] for v in domain_losses.values()]))
