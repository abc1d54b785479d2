"""How a run answers stage failures: CheckFree, CheckFree+ and the baselines they must beat.

Every method sees the same seeded failure trace (``decjax.train.simulation``) and charges its
costs to the simulated clock:

* ``none`` — nothing fails (the no-failure baseline; a failure trace is refused);
* ``checkfree`` — a lost *interior* stage is rebuilt from its neighbours (edge stages never
  fail, as in the reference); downtime = fetching the two neighbours' weights;
* ``checkfree_plus`` — odd microbatches swap the edge stage pairs; any body stage may fail, and
  a lost edge stage copies its swap partner;
* ``checkpoint`` — real orbax checkpoints every ``method.checkpoint_every`` iterations,
  uploaded to ``method.storage_region``; a failure rolls the whole pipeline (weights,
  optimizer, data position) back to the last one and downloads it;
* ``redundant`` — Bamboo-style redundant computation (Thorpe et al., NSDI'23): every node also
  holds its successor's stage and runs its forward, so recovery is lossless and instant, but
  every iteration pays the extra forward work and the stage weights are stored twice.
"""

import dataclasses
import pathlib

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from decjax import checkfree, sim
from decjax.models import StagedLlama, full_route
from decjax.train.simulation import World, check_storage_region
from decjax.train.step import TrainState

METHODS = ("none", "checkfree", "checkfree_plus", "checkpoint", "redundant")


def default_method_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="none",  # none | checkfree | checkfree_plus | checkpoint | redundant
        recovery="weighted",  # checkfree rules: weighted | uniform | copy | random
        power=1,  # exponent on the neighbours' gradient norms (reference: 1)
        lr_scale=1.1,  # persistent learning-rate multiplier of a rebuilt stage
        opt_rule="fresh",  # fresh (reference) | average (neighbours' Adam moments)
        checkpoint_every=50,
        storage_region="Germany",
    ))


def validate_method_config(c: ml_collections.ConfigDict, failures: str, n_stages: int) -> None:
    def require(ok, field, allowed):
        if not ok:
            raise ValueError(f"method.{field}={c[field]!r} is not allowed: {allowed}")

    require(c.name in METHODS, "name", f"one of {', '.join(METHODS)}")
    require(c.recovery in checkfree.RULES, "recovery", f"one of {', '.join(checkfree.RULES)}")
    require(c.power in (1, 2), "power", "1 or 2")
    require(c.lr_scale > 0, "lr_scale", "a number > 0")
    require(c.opt_rule in checkfree.OPT_RULES, "opt_rule",
            f"one of {', '.join(checkfree.OPT_RULES)}")
    require(c.checkpoint_every >= 1, "checkpoint_every", "an integer >= 1")
    require(c.name != "none" or failures == "none", "name",
            "a method that handles failures when sim.failures is set "
            "(use sim.failures='none' for the no-failure baseline)")
    # Plain CheckFree fails only interior stages; with two stages its trace would be empty.
    require(c.name != "checkfree" or failures == "none" or n_stages >= 3, "name",
            f"with model.n_stages={n_stages} there is no interior stage to lose or rebuild "
            "(plain CheckFree never fails an edge stage): use model.n_stages >= 3, or "
            "method.name='checkfree_plus', which recovers edge stages too")


@dataclasses.dataclass
class Recovery:
    """What handling this iteration's failures did."""

    state: TrainState
    seconds: dict[str, float]
    events: list[dict]
    rollback_to: int | None = None  # the step the run went back to (checkpointing)
    data_state: dict | None = None


class Method:
    """No failures: full routes, no recovery, no extra cost."""

    name = "none"

    def __init__(self, config, model: StagedLlama, tx, world: World, workdir: pathlib.Path):
        self.config, self.model, self.tx, self.world = config, model, tx, world
        self.workdir = workdir
        self._route = full_route(config.train.microbatches, model.n_stages)

    def route(self, step: int) -> np.ndarray:
        return self._route

    def iteration(self, seed: int) -> sim.Estimate:
        return self.world.iteration(seed=seed)

    def eligible_stages(self) -> np.ndarray:
        return np.arange(self.model.n_stages)

    def recover(self, step, state, failed, grad_norms) -> Recovery:
        raise RuntimeError(f"method.name={self.name!r} cannot handle failures")

    def after_step(self, step: int, state: TrainState, data_state: dict) -> dict[str, float]:
        """Called after every step (and at step 0); returns simulated seconds spent by kind."""
        return {}

    def close(self) -> None:
        pass

    def describe(self) -> dict:
        return {"method": self.name}


class CheckFree(Method):
    name = "checkfree"
    swaps = False

    def eligible_stages(self):
        # The reference never fails the edge stages of plain CheckFree.
        return np.arange(1, self.model.n_stages - 1)

    def recover(self, step, state, failed, grad_norms) -> Recovery:
        c = self.config.method
        clip = self.config.opt.clip_norm or np.inf
        post_clip = np.minimum(grad_norms, clip)  # the reference measures after clipping
        rule, events = c.recovery, []
        if len(set(failed)) == self.model.n_stages:  # nothing left to rebuild from
            rule = "random"
            events.append(dict(event="unrecoverable", stages=[int(s) for s in failed]))
        repairs = checkfree.plan_repairs(failed, self.model.n_stages, rule=rule,
                                         grad_norms=post_clip, power=c.power, swaps=self.swaps)
        fresh = None
        if rule == "random":
            fresh = self.model.init(jax.random.fold_in(jax.random.key(self.config.seed), step))
        params, opt_state = checkfree.apply_repairs(
            state.params, state.opt_state, self.tx, repairs, fresh_params=fresh,
            lr_scale=c.lr_scale, opt_rule=c.opt_rule)
        downtime = max(self._fetch_seconds(r) for r in repairs)
        events += [dict(event="recovery", stage=r.stage, kind=r.kind, left=r.left,
                        right=r.right, weight_right=r.weight_right) for r in repairs]
        return Recovery(state._replace(params=params, opt_state=opt_state),
                        {"recovery": downtime}, events)

    def _fetch_seconds(self, repair: checkfree.Repair) -> float:
        """A replacement node fetches its sources' weights (in parallel) before training on."""
        if repair.kind == "random":
            return 0.0
        nodes, placement = self.world.stage_nodes, self.world.placement
        target = nodes[repair.stage][0]
        nbytes = self.world.stage_param_bytes[repair.stage]
        return max(placement.transfer_seconds(nodes[src][0], target, nbytes)
                   for src in {repair.left, repair.right})


class CheckFreePlus(CheckFree):
    name = "checkfree_plus"
    swaps = True

    def __init__(self, *args):
        super().__init__(*args)
        self._route = checkfree.checkfree_plus_routes(self.config.train.microbatches,
                                                      self.model.n_stages)

    def eligible_stages(self):
        return np.arange(self.model.n_stages)

    def describe(self):
        report = checkfree.io_replica_overhead(self.model.abstract_params())
        return {"method": self.name, "io_replicas": report}


class Checkpointing(Method):
    name = "checkpoint"

    def __init__(self, *args):
        super().__init__(*args)
        self.every = self.config.method.checkpoint_every
        self._manager = ocp.CheckpointManager(
            (self.workdir / "rollback").absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                                 enable_async_checkpointing=False),
            item_names=("state", "data"))
        nodes = [n for row in self.world.stage_nodes for n in row]
        bytes_per_node = max(self.world.stage_param_bytes)
        region = check_storage_region(self.config, self.world)
        self.upload = sim.checkpoint_transfer(nodes, self.world.placement, region,
                                              bytes_per_node, kind="upload").seconds
        self.download = sim.checkpoint_transfer(nodes, self.world.placement, region,
                                                bytes_per_node, kind="download").seconds

    def after_step(self, step, state, data_state):
        if step % self.every:
            return {}
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))
        return {"checkpoint_upload": self.upload}

    def recover(self, step, state, failed, grad_norms) -> Recovery:
        last = self._manager.latest_step()  # the run saves one at step 0
        restored = self._manager.restore(last, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(jax.eval_shape(lambda: state)),
            data=ocp.args.JsonRestore()))
        restored_state, data_state = restored.state, restored.data
        events = [dict(event="rollback", stages=[int(s) for s in failed], to_step=last)]
        return Recovery(restored_state, {"checkpoint_download": self.download}, events,
                        rollback_to=last, data_state=data_state)

    def close(self):
        self._manager.close()


class Redundant(Method):
    name = "redundant"

    def iteration(self, seed):
        # Every node also runs its successor's forward: forward work doubles.
        doubled = dataclasses.replace(self.world.cost, forward_s=2 * self.world.cost.forward_s)
        return dataclasses.replace(self.world, cost=doubled).iteration(seed=seed)

    def recover(self, step, state, failed, grad_norms) -> Recovery:
        events = [dict(event="recovery", stage=int(s), kind="redundant_copy") for s in failed]
        return Recovery(state, {}, events)

    def describe(self):
        return {"method": self.name, "weight_memory_factor": 2.0}


def make_method(config, model: StagedLlama, tx: optax.GradientTransformation, world: World,
                workdir: pathlib.Path) -> Method:
    cls = {"none": Method, "checkfree": CheckFree, "checkfree_plus": CheckFreePlus,
           "checkpoint": Checkpointing, "redundant": Redundant}[config.method.name]
    return cls(config, model, tx, world, workdir)
