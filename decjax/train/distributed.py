"""Replicated training (data parallel, DiLoCo, NoLoCo) over real processes, surviving kill -9.

    python -m decjax.launch --processes=4 -- python -m decjax.train \\
        --config=configs/noloco.py:size=tiny --workdir=runs/noloco-4p

One replica per device, devices spread over processes; the step is the one of
:mod:`decjax.train.replicated` under ``jax.shard_map`` over a global mesh, so a run with
``R`` replicas gives the numbers of the one-process ``vmap`` run with ``R`` replicas. Each
process reads only its own replicas' data shards; only process 0 writes the run record.

When a process dies, the survivors' next step fails on all of them at once; they agree on the
live devices, log a ``failure`` event, rebuild the mesh over the live replicas (``regroup``:
NoLoCo redraws its groups for the new count, an odd count making one group of three;
DiLoCo and data parallel all-reduce over the live replicas) and redo the step. A replacement
process (``python -m decjax.launch --respawn=1``) joins at the next ``dist.join_check_every``
step: a new membership epoch, then its replica copies a live peer's whole state (parameters,
anchor, momentum, inner optimizer) and reads the data shard of the replica it replaces from
the current position (``join`` event).

Every sync step records its measured seconds beside the simulated WAN seconds of the same
synchronisation (``decjax.sim``, the 12-region table, replicas placed round robin).
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

from decjax import sim
from decjax.data import eval_batches, train_iterator
from decjax.dist import Group, state
from decjax.optim.replicas import groups_of_round
from decjax.train import records
from decjax.train.replicated import (
    AXIS,
    NOLOCO,
    Replicas,
    ReplicatedConfig,
    init_replicas,
    load_run_data,
    make_evaluate,
    make_train_step,
)
from decjax.train.stage_failures import block_bytes, failure_trace, rebuild_lost

SIM_METHOD = {"dp": "allreduce", "diloco": "allreduce", "diloco_nesterov": "allreduce",
              "noloco": "gossip"}


def run_config(config: ml_collections.ConfigDict) -> ReplicatedConfig:
    """The :class:`ReplicatedConfig` of a ``trainer='replicated'`` config file."""
    try:
        return ReplicatedConfig(**config.run.to_dict())
    except TypeError as e:  # an unknown field
        raise ValueError(f"config.run: {e}; fields are those of ReplicatedConfig") from None


@dataclasses.dataclass
class _Layout:
    """The current epoch's mesh and what sits on it."""

    devices: list
    replica_ids: list[int]  # replica id at each mesh position

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return jax.sharding.Mesh(np.array(self.devices), (AXIS,))

    def local_ids(self, process_id: int) -> list[int]:
        return [r for d, r in zip(self.devices, self.replica_ids, strict=True)
                if d.process_index == process_id]


class _Programs:
    """The jitted functions of one layout (rebuilt, and recompiled, when the layout changes)."""

    def __init__(self, graphdef, tx, config: ReplicatedConfig, eval_rows, mesh):
        replicated = jax.NamedSharding(mesh, jax.P())
        self.mesh = mesh
        self.step = make_train_step(graphdef, tx, config.method, mesh=mesh)
        self.evaluate = make_evaluate(graphdef, eval_rows, out_shardings=replicated)
        self.mean = jax.jit(jnp.mean, out_shardings=replicated)
        self.gather = jax.jit(lambda x: x, out_shardings=replicated)  # readable on every process


def _read(x) -> np.ndarray:
    """A replicated global array as NumPy (its local copy)."""
    return np.asarray(x.addressable_data(0))


def train(config: ReplicatedConfig, dist_settings: ml_collections.ConfigDict,
                      workdir: str | pathlib.Path, *, config_json: str = "") -> dict | None:
    """Trains ``config`` as one member of the process group; process 0 returns the result.

    Args:
      config: the run; ``n_replicas`` must equal the group's device count at the start.
      dist_settings: ``config.dist`` (:func:`decjax.dist.default_dist_config`).
      workdir: the run record (process 0 writes it); must not hold a finished run.
      config_json: the full config, compared across processes before training.

    Returns:
      The result dict written to ``result.json`` on process 0; ``None`` elsewhere.
    """
    return run_in_group(_Trainer, config, dist_settings, workdir, config_json)


def run_in_group(trainer, config, dist_settings: ml_collections.ConfigDict,
                 workdir: str | pathlib.Path, config_json: str = "") -> dict | None:
    """``trainer(config, group, workdir).run()`` as one member of the process group, refusing
    a workdir that holds a finished run before anything connects or writes."""
    workdir = pathlib.Path(workdir)
    if (workdir / "result.json").exists():
        raise ValueError(f"workdir={str(workdir)!r} already holds a finished run "
                         "(result.json); choose a new workdir")
    group = Group.connect(dist_settings, config_json or json.dumps(dataclasses.asdict(config)))
    try:
        return trainer(config, group, workdir).run()
    finally:
        group.close()


class _Trainer:
    def __init__(self, config: ReplicatedConfig, group: Group, workdir: pathlib.Path):
        self.config, self.group, self.workdir = config, group, workdir
        self.data = load_run_data(config)
        # One replica's initial state (the optimizer built as for the run: same state layout).
        one = dataclasses.replace(config, n_replicas=1, stage_recovery="checkfree")
        self.graphdef, self.tx, self.init = init_replicas(one, self.data.vocab_size)
        self.eval_rows = np.stack(eval_batches(self.data, batch_size=config.eval_batch_size,
                                               num_batches=config.eval_batches))
        self.record = None
        if group.is_leader:  # a restarted group keeps the record of the steps before it
            resumed = group.joined_with["step"] if group.joined_with else 0
            self.record = records.RunRecord(workdir, resume_step=resumed)
            if not resumed:
                self.record.write_config(group.config_json)
        self.n_params = sum(x[0].size for x in jax.tree.leaves(self.init.params))
        network = sim.Network.gcp12()
        self.sim_world = (network, sim.place_round_robin(network, config.n_replicas))
        self.iterators: dict[int, object] = {}
        self._failure: Exception | None = None
        self.stage_trace = failure_trace(config.n_replicas, config.n_layers, config.steps,
                                         config.stage_failure_rate, config.seed)

    # -- the record (process 0) -------------------------------------------------------------

    def event(self, step: int, name: str, **details) -> None:
        if self.record is not None:
            self.record.event(step, name, **details)

    def metrics(self, step: int, split: str, values: dict) -> None:
        if self.record is not None:
            self.record.metrics(step, split, values)

    # -- layout and state ---------------------------------------------------------------------

    def _iterator(self, replica_id: int, position: int):
        c = self.config
        it = train_iterator(self.data, batch_size=c.global_batch // c.n_replicas, seed=c.seed,
                            shard_index=replica_id, num_shards=c.n_replicas, prefetch=0)
        it.set_state({"next_index": position})
        return it

    def _local_rows(self, layout: _Layout, step: int) -> np.ndarray:
        """``int32[local replicas, B, T+1]`` of ``step`` (1-based) for this process."""
        for r in layout.local_ids(self.group.process_id):
            if r not in self.iterators:
                self.iterators[r] = self._iterator(r, step - 1)
        return np.stack([next(self.iterators[r]) for r in layout.local_ids(self.group.process_id)])

    def _fresh_state(self, n_local: int):
        return jax.tree.map(lambda x: np.repeat(np.asarray(x), n_local, axis=0),
                            (self.init.params, self.init.opt_state))

    def run(self) -> dict | None:
        c, group = self.config, self.group
        joined = group.joined_with
        if joined is None:
            layout = _Layout(group.devices, list(range(len(group.devices))))
            if len(layout.devices) != c.n_replicas:
                fix = ("set n_replicas (or --devices_per_process) to match" if group.distributed
                       else f"on a CPU, start with JAX_NUM_CPU_DEVICES={c.n_replicas}")
                raise ValueError(
                    f"n_replicas={c.n_replicas} but the group has {len(layout.devices)} devices "
                    f"({len({d.process_index for d in layout.devices})} processes): one replica "
                    f"per device, so {fix}")
            step = 0
            host = self._fresh_state(len(layout.local_ids(group.process_id)))
            self.event(0, "start", processes=len({d.process_index for d in layout.devices}),
                       replicas=len(layout.devices), replica_ids=layout.replica_ids,
                       devices=[str(d) for d in layout.devices], n_params=self.n_params)
        else:  # a restarted group: survivors reload their replicas, joiners copy peers
            layout = _Layout(group.devices, joined["replica_ids"])
            step = joined["step"]
            mine = layout.local_ids(group.process_id)
            host = state.load_local(self._fresh_state(len(mine)), mine,
                                    [r not in joined["new_replica_ids"] for r in mine],
                                    self._state_dir)
        programs = _Programs(self.graphdef, self.tx, c, self.eval_rows, layout.mesh)
        replicas = state.to_mesh(host, programs.mesh)
        if joined is not None:
            t0 = time.perf_counter()
            replicas = self._copy_from_peers(replicas, layout, joined, programs.mesh)
            self.event(step, "join", replica_ids=joined["new_replica_ids"],
                       donors=joined["donors"], replicas=len(layout.devices),
                       epoch=group.membership.epoch, copy_seconds=time.perf_counter() - t0,
                       copy_bytes=len(joined["donors"]) * state.nbytes(replicas),
                       restart_seconds=time.time() - joined["regroup_time"])
        if step == 0:
            with group.live():
                self._evaluate(programs, replicas, 0)
        n_processes = len({d.process_index for d in layout.devices})
        bar = tqdm(total=c.steps, initial=step, disable=not (c.progress and group.is_leader),
                   desc=f"{c.method} R={c.n_replicas} x{n_processes}p", leave=False)
        rows, checked = None, step  # a joiner enters after its group checked this step
        while step < c.steps:
            if checked != step:
                checked = step
                joiners = group.pending_joins(step)
                if joiners:
                    self._grow(layout, replicas, joiners, step)
            if rows is None:
                rows = self._local_rows(layout, step + 1)
            began = time.perf_counter()
            evaluate = (step + 1) % c.eval_every == 0 or step + 1 == c.steps
            outcome = self._try_step(programs, replicas, rows, layout, evaluate)
            if outcome is None:  # a member died: regroup over the live ones, redo the step
                layout, programs, replicas = self._shrink(layout, replicas, step, began)
                rows = None  # the lost replicas' rows go; the survivors re-read theirs
                for r in list(self.iterators):
                    if r in layout.local_ids(group.process_id):
                        self.iterators[r].set_state({"next_index": step})
                continue
            replicas, mean_loss, seconds, evaluation, norms_RL = outcome
            step += 1
            rows = None
            self._after_step(step, layout, mean_loss, seconds - began)
            if evaluation is not None:
                evaluation["step"] = step
                self._record_eval(evaluation)
            if step in self.stage_trace:  # nodes lost after this step, rebuilt before the next
                norms = _read(programs.gather(norms_RL))  # every block's last gradient norm
                replicas = self._rebuild_stages(replicas, layout, step, norms)
            bar.update(1)
        bar.close()
        return self._finish(layout)

    def _try_step(self, programs, replicas, rows, layout, evaluate: bool):
        """One step (and evaluation) in one atomic block: ``(replicas, mean loss, end time,
        evaluation, block gradient norms)``; ``None`` if a member died."""
        try:
            with self.group.live() as live:
                if len(live) != len(layout.devices):
                    return None
                batch = state.to_mesh(rows, programs.mesh)
                replicas, loss_R, norms_RL = programs.step(Replicas(*replicas), batch)
                mean_loss = float(_read(programs.mean(loss_R)))
                done = time.perf_counter()  # the step's time, without the evaluation
                evaluation = self._evaluate(programs, replicas, None) if evaluate else None
            return tuple(replicas), mean_loss, done, evaluation, norms_RL
        except (ProcessFailureError, jax.errors.JaxRuntimeError) as failure:
            if not self.group.distributed:
                raise
            self._failure = failure
            return None

    def _rebuild_stages(self, replicas, layout: _Layout, step: int, block_norms: np.ndarray):
        """This step's lost blocks rebuilt; one ``stage_failure`` event each, with the
        simulated seconds of the recovery's transfer (a replica's nodes share its region:
        CheckFree fetches the two neighbours there in parallel, a peer copy comes from the
        peer's region with the block's whole optimizer state)."""
        replicas, events = rebuild_lost(replicas, self.stage_trace[step], layout.replica_ids,
                                        self.config.stage_recovery, block_norms)
        network, placement = self.sim_world
        for e in events:
            here, block = placement.region_of(e["replica_id"]), e["block"]
            if e["recovery"] == "peer_copy":
                nbytes = block_bytes(replicas[0], block) + block_bytes(replicas[1], block)
                source, senders = placement.region_of(e["peer_id"]), 1
            else:
                nbytes, source, senders = block_bytes(replicas[0], block), here, 2
            self.event(step, "stage_failure", **e, sim_recovery_bytes=senders * nbytes,
                       sim_recovery_seconds=network.transfer_seconds(source, here, nbytes))
        return replicas

    def _after_step(self, step, layout, mean_loss, seconds):
        c = self.config
        sync = step % c.h == 0
        values = {"loss": mean_loss, "step_seconds": seconds, "sync": sync,
                  "replicas": len(layout.devices)}
        if sync:
            values["sim_sync_seconds"], values["sim_sync_bytes"] = self._sim_sync(
                len(layout.devices), step // c.h - 1)
        self.metrics(step, "train", values)

    def _sim_sync(self, n_replicas: int, round_index: int) -> tuple[float, float]:
        """Simulated WAN seconds and bytes of this synchronisation (float32 messages)."""
        network, placement = self.sim_world
        method = SIM_METHOD[self.config.method]
        groups = None
        if method == "gossip":
            groups = groups_of_round(round_index, n_replicas, NOLOCO["group_size"],
                                     pool_size=NOLOCO["pool_size"], seed=self.config.seed)
        cost = sim.sync_cost(method, list(range(n_replicas)), placement, 4 * self.n_params,
                             groups=groups)
        return cost.seconds, cost.bytes

    def _evaluate(self, programs, replicas, step: int | None) -> dict:
        """Validation losses of every replica; recorded at once for ``step`` 0, else by
        :meth:`_after_step` once the step has succeeded."""
        loss_R, averaged, spread = programs.evaluate(replicas[0])
        result = {"step": step, "loss_R": _read(loss_R).tolist(),
                  "averaged": float(_read(averaged)), "spread": float(_read(spread))}
        if step is not None:
            self._record_eval(result)
        return result

    def _record_eval(self, result: dict) -> None:
        self.metrics(result["step"], "val", {"loss": float(np.mean(result["loss_R"])),
                                             "loss_R": result["loss_R"],
                                             "loss_averaged": result["averaged"],
                                             "spread": result["spread"]})

    # -- membership changes ------------------------------------------------------------------

    def _shrink(self, layout: _Layout, replicas, step: int, began: float):
        host = state.to_host(replicas)
        lost_processes = self.group.shrink()
        detected = time.perf_counter() - began
        if not lost_processes:
            raise self._failure
        t0 = time.perf_counter()
        kept = [i for i, d in enumerate(layout.devices) if d in self.group.devices]
        lost_ids = [r for i, r in enumerate(layout.replica_ids) if i not in kept]
        layout = _Layout(self.group.devices, [layout.replica_ids[i] for i in kept])
        for r in lost_ids:
            self.iterators.pop(r, None)
        programs = _Programs(self.graphdef, self.tx, self.config, self.eval_rows, layout.mesh)
        replicas = state.to_mesh(host, programs.mesh)
        self.event(step, "failure", processes=sorted(lost_processes), replica_ids=lost_ids,
                   detect_seconds=detected, error=type(self._failure).__name__)
        self.event(step, "regroup", replicas=len(layout.devices),
                   replica_ids=layout.replica_ids, reconfigure_seconds=time.perf_counter() - t0,
                   **self._groups_note(len(layout.devices), step))
        return layout, programs, replicas

    def _groups_note(self, n_replicas: int, step: int) -> dict:
        if self.config.method != "noloco":
            return {"collective": "all-reduce over the live replicas"}
        return {"next_groups": groups_of_round(step // self.config.h, n_replicas,
                                               NOLOCO["group_size"], pool_size=NOLOCO["pool_size"],
                                               seed=self.config.seed)}

    def _grow(self, layout: _Layout, replicas, tokens: list[str], step: int) -> None:
        """Admits joiners: saves this process's replicas and leaves for the group's restart.

        Raises :class:`decjax.dist.group.Regroup` (the entry point exits with its code), unless
        no replica id is free for a joiner (then nothing happens).
        """
        free = sorted(set(range(self.config.n_replicas)) - set(layout.replica_ids))
        per_process = len(self.group.local_devices)  # a replacement has as many devices
        tokens = tokens[:len(free) // per_process]  # the rest wait for a free replica id
        if not tokens:
            return
        renumber, joiners = self.group.plan_grow(tokens)
        by_process: dict[int, list[int]] = {}
        for d, r in zip(layout.devices, layout.replica_ids, strict=True):
            by_process.setdefault(renumber[d.process_index], []).append(r)
        for i, p in enumerate(sorted(joiners.values())):
            by_process[p] = free[i * per_process:(i + 1) * per_process]
        replica_ids = [r for p in sorted(by_process) for r in by_process[p]]
        new_ids = [r for p in joiners.values() for r in by_process[p]]
        survivors = [i for i, r in enumerate(replica_ids) if r not in new_ids]
        donors = [(survivors[k % len(survivors)], replica_ids.index(r))
                  for k, r in enumerate(new_ids)]
        state.save_local(state.to_host(replicas), layout.local_ids(self.group.process_id),
                         self._state_dir)
        self.event(step, "regroup_start", tokens=tokens, replica_ids=new_ids)
        self.group.regroup(tokens, {"step": step, "replica_ids": replica_ids,
                                    "new_replica_ids": new_ids, "donors": donors,
                                    "epoch_start_time": time.time()})

    @property
    def _state_dir(self) -> pathlib.Path:
        return self.group.rendezvous / "state"

    def _copy_from_peers(self, replicas, layout, extra, mesh):
        with self.group.live():
            copied = state.copy_replicas(replicas, mesh, [tuple(p) for p in extra["donors"]])
            jax.block_until_ready(copied)
        return copied

    # -- the end ------------------------------------------------------------------------------

    def _finish(self, layout: _Layout) -> dict | None:
        """Process 0 writes ``result.json``, from the run record (it spans every epoch)."""
        if not self.group.is_leader:
            return None
        c = self.config
        rows = records.read_jsonl(self.record.metrics_path)
        train = [r for r in rows if r["split"] == "train"]
        val = [r for r in rows if r["split"] == "val"]
        lost = [e for e in records.read_jsonl(self.record.events_path)
                if e["event"] == "stage_failure"]
        plain = [r["step_seconds"] for r in train if not r["sync"]]
        synced = [r["step_seconds"] for r in train if r["sync"]]
        result = dict(
            config=dataclasses.asdict(c), n_params=self.n_params,
            processes=len({d.process_index for d in layout.devices}),
            final_replica_ids=layout.replica_ids,
            eval_steps=[r["step"] for r in val], val_loss_mean=[r["loss"] for r in val],
            val_loss_averaged=[r["loss_averaged"] for r in val],
            spread=[r["spread"] for r in val], final_replica_losses=val[-1]["loss_R"],
            train_loss=[r["loss"] for r in train],
            median_step_seconds=float(np.median(plain)) if plain else None,
            median_sync_step_seconds=float(np.median(synced)) if synced else None,
            stage_failures=len(lost),
            sim_recovery_seconds=sum(e["sim_recovery_seconds"] for e in lost))
        records.write_atomically(self.workdir / "result.json", json.dumps(result))
        self.event(c.steps, "end", val_loss=result["val_loss_mean"][-1],
                   replicas=len(layout.devices))
        self.record.close()
        return result
