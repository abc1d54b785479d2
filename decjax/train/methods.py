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
  every iteration pays the extra forward work and the stage weights are stored twice;

and three combinations (``experiments/combinations``):

* ``checkfree_reroute`` — CheckFree + SkipPipe: rebuilt as ``checkfree``, but microbatches
  route around the lost stage while the replacement fetches, instead of stalling;
* ``reroute`` — never rebuilt: the lost stage is skipped by training and evaluation for good;
* ``peer_copy`` — copied exactly, with its optimizer state, from a data-parallel peer replica;

and ``skippipe``, SkipPipe's partial pipelines without failures (``configs/skippipe.py``).
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
from decjax.train.step import TrainState, make_train_step

METHODS = ("none", "checkfree", "checkfree_plus", "checkpoint", "redundant", "checkfree_reroute",
           "reroute", "peer_copy", "skippipe")


def default_method_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="none",  # one of METHODS
        recovery="weighted",  # checkfree rules: weighted | uniform | copy | random
        power=1,  # exponent on the neighbours' gradient norms (reference: 1)
        lr_scale=1.1,  # persistent learning-rate multiplier of a rebuilt stage
        opt_rule="fresh",  # fresh (reference) | average (neighbours' Adam moments)
        checkpoint_every=50,
        storage_region="Germany",
        skip_ratio=0.25,  # skippipe: share of the body stages each microbatch skips
        max_swaps=2,  # skippipe: adjacent-stage swaps allowed per path
        gcma_evaluations=2000,  # skippipe: partitions the node allocation scores
        plan_evaluations=4000,  # skippipe: simulated candidates per planned schedule
        plan_budget_s=3.0,  # skippipe: planner seconds per schedule (evaluations may end first)
        plans_file="",  # skippipe: stored rotating plans (decjax.skippipe.save_rotations); "": plan
        skip_until=1.0,  # skippipe: share of the iterations on skip schedules, full ones after
    ))


def validate_method_config(c: ml_collections.ConfigDict, failures: str, n_stages: int,
                           replicas: int) -> None:
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
    require(0.0 <= c.skip_ratio < 1.0, "skip_ratio", "in [0, 1)")
    require(isinstance(c.max_swaps, int) and c.max_swaps >= 0, "max_swaps", "an integer >= 0")
    for field in ("gcma_evaluations", "plan_evaluations"):
        require(isinstance(c[field], int) and c[field] >= 1, field, "an integer >= 1")
    require(c.plan_budget_s > 0, "plan_budget_s", "a number > 0")
    require(0.0 < c.skip_until <= 1.0, "skip_until", "in (0, 1]")
    require(c.name != "skippipe" or failures == "none", "name",
            "a method without failure handling: skippipe needs sim.failures='none'")
    require(c.name != "none" or failures == "none", "name",
            "a method that handles failures when sim.failures is set "
            "(use sim.failures='none' for the no-failure baseline)")
    # Plain CheckFree fails only interior stages; with two stages its trace would be empty.
    require(c.name != "peer_copy" or replicas >= 2, "name",
            f"with sim.replicas={replicas} there is no peer replica to copy a lost stage from: "
            "use sim.replicas >= 2")
    require(c.name not in ("checkfree", "checkfree_reroute", "reroute") or failures == "none"
            or n_stages >= 3, "name",
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

    def train_step(self):
        """The pure train step (the loop jits it)."""
        return make_train_step(self.model, self.tx)

    def eval_route(self) -> np.ndarray:
        """The route evaluation runs along: the whole model unless stages are gone for good."""
        return full_route(self.config.train.microbatches, self.model.n_stages)

    def state(self) -> dict:
        """What a resumed run needs beyond the train state (saved with each checkpoint)."""
        return {}

    def set_state(self, state: dict) -> None:
        pass

    def iteration(self, seed: int) -> sim.Estimate:
        return self.world.iteration(seed=seed)

    def step_seconds(self, step: int, iteration: sim.Estimate) -> float:
        """Simulated seconds of 0-based ``step``, given the run's current ``iteration``."""
        return iteration.seconds

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
        return _interior(self.model.n_stages)

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


def _skipping(route_MP: np.ndarray, stages) -> np.ndarray:
    """``route_MP`` with every slot of ``stages`` made a skip slot (-1: activations pass)."""
    return np.where(np.isin(route_MP, list(stages)), -1, route_MP).astype(np.int32)


def _interior(n_stages: int) -> np.ndarray:
    return np.arange(1, n_stages - 1)


class CheckFreeReroute(CheckFree):
    """CheckFree + SkipPipe (ours): the lost stage is rebuilt as CheckFree rebuilds it, but the
    pipeline does not stall while the replacement fetches its neighbours' weights; microbatches
    skip the stage instead, for as many whole iterations as the fetch takes (at least one).
    Same interior-only failures as plain CheckFree, so both see one trace."""

    name = "checkfree_reroute"

    def __init__(self, *args):
        super().__init__(*args)
        self._skip_for: dict[int, int] = {}  # stage -> iterations it is still routed around
        self._iteration_s = self.world.iteration(seed=self.config.sim.failure_seed).seconds

    def recover(self, step, state, failed, grad_norms) -> Recovery:
        rebuilt = super().recover(step, state, failed, grad_norms)
        fetch_s = rebuilt.seconds.get("recovery", 0.0)
        iterations = max(1, int(np.ceil(fetch_s / self._iteration_s)))
        for stage in {int(s) for s in failed}:
            self._skip_for[stage] = max(self._skip_for.get(stage, 0), iterations)
        events = rebuilt.events + [dict(event="reroute", stages=sorted(self._skip_for),
                                        iterations=iterations, fetch_seconds=fetch_s)]
        return Recovery(rebuilt.state, {}, events)  # no stall: the fetch overlaps training

    def route(self, step):
        return _skipping(self._route, self._skip_for)

    def after_step(self, step, state, data_state):
        self._skip_for = {s: n - 1 for s, n in self._skip_for.items() if n > 1}
        return {}

    def state(self):
        return {"skip_for": {str(s): n for s, n in self._skip_for.items()}}

    def set_state(self, state):
        self._skip_for = {int(s): n for s, n in state.get("skip_for", {}).items()}


class Reroute(Method):
    """SkipPipe instead of CheckFree (ours): a lost stage is never rebuilt; every later
    microbatch, and evaluation, skips it, so the model loses depth with each failure (the
    SkipPipe paper's omitted-stage robustness, used for recovery). Interior failures only, as
    plain CheckFree, so both see one trace."""

    name = "reroute"

    def __init__(self, *args):
        super().__init__(*args)
        self._lost: set[int] = set()

    def eligible_stages(self):
        return _interior(self.model.n_stages)

    def recover(self, step, state, failed, grad_norms) -> Recovery:
        new = sorted({int(s) for s in failed} - self._lost)
        self._lost.update(new)
        events = [dict(event="reroute", stage=s, lost=sorted(self._lost)) for s in new]
        return Recovery(state, {}, events)

    def route(self, step):
        return _skipping(self._route, self._lost)

    def eval_route(self):
        return _skipping(super().eval_route(), self._lost)

    def state(self):
        return {"lost": sorted(self._lost)}

    def set_state(self, state):
        self._lost = set(state.get("lost", []))


class PeerCopy(Method):
    """The baseline the CheckFree papers skip: with data-parallel replicas every replica holds
    the same stage weights and optimizer state, so a lost stage is restored exactly by copying
    both from the same stage of the nearest peer replica. Costs the copy's transfer time (3x
    the weights: parameters and Adam's two moments); any stage can fail, as in CheckFree+."""

    name = "peer_copy"

    def recover(self, step, state, failed, grad_norms) -> Recovery:
        nodes, placement = self.world.stage_nodes, self.world.placement
        seconds, events = 0.0, []
        for stage in sorted({int(s) for s in failed}):
            nbytes = 3 * self.world.stage_param_bytes[stage]
            target, peers = nodes[stage][0], nodes[stage][1:]
            copy_s = min(placement.transfer_seconds(p, target, nbytes) for p in peers)
            seconds = max(seconds, copy_s)  # lost stages copy in parallel
            events.append(dict(event="recovery", stage=stage, kind="peer_copy",
                               copy_seconds=copy_s))
        return Recovery(state, {"recovery": seconds}, events)


class SkipPipe(Method):
    """SkipPipe (Blagoev et al., arXiv 2502.19913): every microbatch skips ``skip_ratio`` of the
    body stages (and may swap adjacent ones) along paths planned on the SkipPipe reference
    network: io on 5 nodes, 3 nodes per body stage, a GCMA-style node allocation over the GCP
    12-region table, the reference's 500M costs (:func:`decjax.skippipe.reference_instance`).
    Iterations cycle over rotating planned schedules (each body stage visited equally often),
    planned here or read from ``plans_file``; gradients are normalised by each stage's
    visitors; the clock charges the schedules' mean simulated makespan. ``skip_ratio=0`` trains
    full pipelines on the allocation's aligned pipelines (the DT-FM baseline), as does every
    iteration from ``skip_until`` of the run on. No failures."""

    name = "skippipe"

    def __init__(self, *args):
        super().__init__(*args)
        from decjax import skippipe  # decjax.skippipe imports decjax.train.step

        c, n_stages = self.config.method, self.model.n_stages
        n_microbatches = self.config.train.microbatches
        partition = (5,) + (3,) * n_stages
        _, placement, cost, nbytes = skippipe.reference_instance(partition)
        # The allocation belongs to the deployment, not to the training seed: seed 0 for all.
        allocation = skippipe.gcma_allocation(
            placement, partition, cost, activation_bytes=nbytes, seed=0,
            max_evaluations=c.gcma_evaluations, time_budget_s=600.0)
        full = skippipe.aligned_pipeline_schedule(allocation.allocation, allocation.pipelines,
                                                  n_microbatches)
        if c.skip_ratio == 0:
            schedules = [full]
        elif c.plans_file:
            schedules = self._stored_plans(c, allocation.allocation)
        else:
            schedules = skippipe.rotating_plans(
                allocation.allocation, placement, cost, n_microbatches=n_microbatches,
                skip_ratio=c.skip_ratio, activation_bytes=nbytes, max_swaps=c.max_swaps,
                max_evaluations=c.plan_evaluations, time_budget_s=c.plan_budget_s)
        for s in schedules:
            skippipe.validate(s, n_stages=n_stages, skip_ratio=c.skip_ratio,
                              max_swaps=c.max_swaps)
        self._routes = [s.route(width=n_stages) for s in schedules]
        self._full_route = full.route(width=n_stages)
        self._seconds = [skippipe.makespan(s, placement, cost, activation_bytes=nbytes).seconds
                         for s in schedules]
        self._full_seconds = skippipe.makespan(full, placement, cost,
                                               activation_bytes=nbytes).seconds
        steps = self.config.train.steps
        self._skip_steps = round(c.skip_until * steps) if c.skip_ratio else 0
        self._train_step = skippipe.make_skippipe_train_step

    def _stored_plans(self, c, allocation) -> list:
        from decjax import skippipe

        _, rotations = skippipe.load_rotations(c.plans_file)
        key = skippipe.rotation_key(c.skip_ratio, c.max_swaps)
        if key not in rotations:
            raise ValueError(f"method.plans_file={c.plans_file!r} holds no plans for {key} "
                             f"(it holds: {'; '.join(rotations) or 'none'})")
        plans = rotations[key]["plans"]
        if not all(np.array_equal(p.node_stage, allocation) for p in plans):
            raise ValueError(f"method.plans_file={c.plans_file!r}: its {key} plans are for "
                             "another node allocation (method.gcma_evaluations differs?)")
        return plans

    def route(self, step):
        if step >= self._skip_steps:
            return self._full_route
        return self._routes[step % len(self._routes)]

    def iteration(self, seed):
        seconds = float(np.mean(self._seconds))
        return sim.Estimate(seconds, 0.0, {"makespan": seconds})

    def step_seconds(self, step, iteration):
        return iteration.seconds if step < self._skip_steps else self._full_seconds

    def train_step(self):
        return self._train_step(self.model, self.tx)

    def describe(self):
        from decjax.skippipe import routes_digest

        return {"method": self.name, "skip_ratio": self.config.method.skip_ratio,
                "schedules": len(self._routes), "makespans": self._seconds,
                "full_pipeline_makespan": self._full_seconds, "skip_steps": self._skip_steps,
                "routes_digest": routes_digest(self._routes)}


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
           "checkpoint": Checkpointing, "redundant": Redundant,
           "checkfree_reroute": CheckFreeReroute, "reroute": Reroute,
           "peer_copy": PeerCopy, "skippipe": SkipPipe}[config.method.name]
    return cls(config, model, tx, world, workdir)
