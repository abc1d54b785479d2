"""A group of JAX processes that survives the loss of a member and lets a replacement join.

The group runs on ``jax.distributed`` (XLA's coordination service in process 0; Gloo
collectives on CPU, NCCL on GPU) with recoverability on, so a dead process does not take the
others with it. Membership changes in two ways:

* **shrink** — a step that touches a dead process raises ``ProcessFailureError`` on every
  survivor at once (``multihost_utils.live_devices`` is atomic); the survivors agree on the
  live devices and carry on over them in the same epoch;
* **grow** — a replacement asks to join through the *rendezvous folder*; at the next check
  process 0 admits it (same config only) and the group restarts as a new **epoch**: every
  member saves its replicas to local storage and exits with :data:`REGROUP_EXIT_CODE`, and
  the launcher starts the larger group on a fresh port, survivors keeping their process ids
  and joiners taking those of the dead. The joiners' replicas are then copied from live peers
  over a collective. A restart rather than a re-initialised runtime in the same processes: in
  our tests survivors that re-initialised ``jax.distributed`` in place after a SIGKILL could
  not form the new Gloo group (pairs timed out connecting, every trial), fresh processes
  always could (see the README for the measured cost).

Process 0 hosts the coordinator: its loss ends the run (a JAX limit, documented in the README).
The rendezvous folder must be visible to the joiner and to process 0 (same machine or a shared
filesystem).
"""

import contextlib
import dataclasses
import json
import os
import pathlib
import socket
import time
import uuid

import jax
import ml_collections
from jax._src import distributed as _jax_distributed

ENV_COORDINATOR = "DECJAX_COORDINATOR"
ENV_NUM_PROCESSES = "DECJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "DECJAX_PROCESS_ID"
ENV_RENDEZVOUS = "DECJAX_RENDEZVOUS"
ENV_JOIN = "DECJAX_JOIN"  # set on a replacement process: it joins a running group
ENV_EPOCH = "DECJAX_EPOCH"  # set on the processes of a restarted group
REGROUP_EXIT_CODE = 75  # a member leaves so that the launcher restarts the group larger


class Regroup(Exception):  # noqa: N818 (a signal to the entry point, not an error)
    """This process leaves so that the group restarts, with joiners, as epoch ``epoch``."""

    def __init__(self, epoch: int):
        super().__init__(f"regroup into epoch {epoch}")
        self.epoch = epoch


def default_dist_config() -> ml_collections.ConfigDict:
    """``config.dist``: how the processes of one run find each other and detect failures."""
    return ml_collections.ConfigDict(dict(
        heartbeat_seconds=5,  # a silent process is declared dead after this long
        collective_timeout_seconds=8,  # a CPU collective stuck on a dead peer gives up
        init_timeout_seconds=60,  # every process must have arrived by then
        join_check_every=10,  # steps between checks for replacement processes (0: never)
        join_timeout_seconds=600,  # a replacement waits this long to be let in
    ))


def validate_dist_config(c: ml_collections.ConfigDict) -> None:
    for field in ("heartbeat_seconds", "collective_timeout_seconds", "init_timeout_seconds",
                  "join_timeout_seconds"):
        if not (isinstance(c[field], int) and c[field] >= 1):
            raise ValueError(f"dist.{field}={c[field]!r} is not allowed: an integer >= 1")
    if not (isinstance(c.join_check_every, int) and c.join_check_every >= 0):
        raise ValueError(f"dist.join_check_every={c.join_check_every!r} is not allowed: an "
                         "integer >= 0 (0: never let replacements in)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _write_json(path: pathlib.Path, value) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


@dataclasses.dataclass
class Membership:
    """Where this process stands in the group's current epoch."""

    epoch: int
    process_id: int
    num_processes: int
    coordinator: str


class Group:
    """This process's handle on the group: init, live steps, shrink, grow and shutdown.

    Use :meth:`connect`; a process started without the launcher's variables (and outside a
    detected cluster) gets a one-process group, so the same trainer runs alone.
    """

    def __init__(self, membership: Membership | None, settings: ml_collections.ConfigDict,
                 rendezvous: pathlib.Path | None, config_json: str,
                 joined_with: dict | None = None):
        self.membership, self.settings, self.rendezvous = membership, settings, rendezvous
        self.config_json = config_json
        self.joined_with = joined_with  # what the group told a replacement when it let it in
        self.devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
        self.dead_processes: set[int] = set()

    # -- starting -----------------------------------------------------------------------

    @classmethod
    def connect(cls, settings: ml_collections.ConfigDict, config_json: str = "{}") -> "Group":
        """Joins the group this process was started for (launcher, cluster, or alone).

        ``config_json`` (the run's config) must be the same in every process: a member with
        another one stops the start with an error naming the fields, a replacement with
        another one is turned away.
        """
        validate_dist_config(settings)
        rendezvous = os.environ.get(ENV_RENDEZVOUS)
        rendezvous = pathlib.Path(rendezvous) if rendezvous else None
        if os.environ.get(ENV_JOIN):
            return cls._join(settings, rendezvous, os.environ[ENV_JOIN], config_json)
        joined_with = None
        if ENV_COORDINATOR in os.environ:
            epoch = int(os.environ.get(ENV_EPOCH, "0"))
            membership = Membership(epoch, int(os.environ[ENV_PROCESS_ID]),
                                    int(os.environ[ENV_NUM_PROCESSES]),
                                    os.environ[ENV_COORDINATOR])
            if epoch:
                joined_with = json.loads(
                    (rendezvous / f"regroup-{epoch}.json").read_text())["extra"]
            _initialize(membership, settings)
        elif _cluster_detected():
            _enable_recovery(settings)
            jax.distributed.initialize(initialization_timeout=settings.init_timeout_seconds,
                                       heartbeat_timeout_seconds=settings.heartbeat_seconds)
            membership = Membership(0, jax.process_index(), jax.process_count(),
                                    _jax_distributed.global_state.coordinator_address)
        else:
            membership = None
        group = cls(membership, settings, rendezvous, config_json, joined_with)
        group._check_same_config()
        group._mark_ready()
        return group

    @classmethod
    def _join(cls, settings, rendezvous: pathlib.Path | None, token: str,
              config_json: str) -> "Group":
        """A replacement: asks to join, waits for the epoch that lets it in, initialises."""
        if rendezvous is None:
            raise RuntimeError(f"{ENV_JOIN} is set but {ENV_RENDEZVOUS} is not: a replacement "
                               "needs the group's rendezvous folder")
        _write_json(rendezvous / f"join-{token}.json",
                    {"token": token, "pid": os.getpid(), "config": config_json})
        deadline = time.monotonic() + settings.join_timeout_seconds
        while time.monotonic() < deadline:
            rejected = rendezvous / f"reject-{token}.json"
            if rejected.exists():
                raise ValueError(f"the group turned this replacement away: "
                                 f"{json.loads(rejected.read_text())['reason']}")
            for path in sorted(rendezvous.glob("regroup-*.json")):
                if token in json.loads(path.read_text())["joiners"]:
                    raise Regroup(int(path.stem.removeprefix("regroup-")))
            time.sleep(0.05)
        raise TimeoutError(f"join request {token} was not let in within "
                           f"dist.join_timeout_seconds={settings.join_timeout_seconds}")

    def _mark_ready(self) -> None:
        if self.rendezvous is not None and self.membership is not None:
            m = self.membership
            _write_json(self.rendezvous / f"ready-{m.epoch}-{m.process_id}.json",
                        {"pid": os.getpid(), "epoch": m.epoch, "process_id": m.process_id})

    # -- who is here --------------------------------------------------------------------

    @property
    def distributed(self) -> bool:
        return self.membership is not None

    @property
    def process_id(self) -> int:
        return self.membership.process_id if self.distributed else 0

    @property
    def is_leader(self) -> bool:
        """Process 0: hosts the coordinator and alone writes the shared run record."""
        return self.process_id == 0

    @property
    def local_devices(self) -> list:
        return [d for d in self.devices if d.process_index == self.process_id]

    def live(self):
        """Context for one step: raises ``ProcessFailureError`` on every survivor if a member
        dies before all finish it (a plain context for a one-process group)."""
        if not self.distributed:
            return contextlib.nullcontext(self.devices)
        from jax.experimental import multihost_utils

        return multihost_utils.live_devices(self.devices)

    def shrink(self) -> set[int]:
        """After a failed step: agrees with the survivors on the live devices; returns the
        process ids lost."""
        from jax.experimental import multihost_utils

        with multihost_utils.live_devices(self.devices) as live:
            pass
        live = set(live)
        lost = {d.process_index for d in self.devices if d not in live}
        self.devices = [d for d in self.devices if d in live]
        self.dead_processes |= lost
        return lost

    # -- the key-value store --------------------------------------------------------------

    def _client(self):
        return _jax_distributed.global_state.client

    def agree(self, key: str, value: str | None = None, timeout_s: float = 60.0) -> str:
        """Process 0 publishes ``value`` under ``key``; every member returns it."""
        full = f"decjax/{self.membership.epoch}/{key}"
        if self.is_leader:
            self._client().key_value_set(full, value)
            return value
        return self._client().blocking_key_value_get(full, int(timeout_s * 1000))

    def _check_same_config(self) -> None:
        """Every member must run the same config; raises naming the fields that differ."""
        if not self.distributed:
            return
        client = self._client()
        epoch = self.membership.epoch
        client.key_value_set(f"decjax/{epoch}/config/{self.process_id}", self.config_json)
        timeout = int(self.settings.init_timeout_seconds * 1000)
        for other in sorted({d.process_index for d in self.devices} - {self.process_id}):
            theirs = client.blocking_key_value_get(f"decjax/{epoch}/config/{other}", timeout)
            differ = config_difference(self.config_json, theirs, f"process {other}")
            if differ:
                raise ValueError(f"the processes were started with different configs "
                                 f"({differ}); start every process with the same config")

    # -- growing ----------------------------------------------------------------------------

    def pending_joins(self, step: int) -> list[str]:
        """Join requests to admit now; decided by process 0, the same list on every member."""
        if (not self.distributed or not self.settings.join_check_every or self.rendezvous is None
                or step % self.settings.join_check_every):
            return []
        tokens = ""
        if self.is_leader:
            tokens = ",".join(self._admissible_requests())
        tokens = self.agree(f"joins/{step}", tokens)
        return [t for t in tokens.split(",") if t]

    def _admissible_requests(self) -> list[str]:
        """Join requests with this run's config; the others are turned away with a reason."""
        tokens = []
        for path in sorted(self.rendezvous.glob("join-*.json")):
            request = json.loads(path.read_text())
            differ = config_difference(self.config_json, request["config"], "the replacement")
            if differ:
                _write_json(self.rendezvous / f"reject-{request['token']}.json",
                            {"reason": f"different config ({differ})"})
                path.unlink()
            else:
                tokens.append(request["token"])
        return tokens

    def plan_grow(self, tokens: list[str]) -> tuple[dict[int, int], dict[str, int]]:
        """The process ids of the next epoch: ``(survivors old -> new, joiners by token)``.

        Survivors keep their ids and joiners fill the ids of the dead, lowest first (a
        re-formed Gloo group whose members changed ids did not connect in our tests); only
        when fewer join than died are the highest survivors moved down to close the gaps.
        """
        survivors = sorted({d.process_index for d in self.devices})
        n_new = len(survivors) + len(tokens)
        renumber = {p: p for p in survivors if p < n_new}
        movers = [p for p in survivors if p >= n_new]
        holes = [p for p in range(n_new) if p not in renumber]
        for p, hole in zip(movers, holes, strict=False):
            renumber[p] = hole
        holes = [p for p in range(n_new) if p not in renumber.values()]
        return renumber, dict(zip(tokens, holes, strict=True))

    def regroup(self, tokens: list[str], extra: dict) -> None:
        """Ends this epoch so that the launcher restarts the group with the joiners ``tokens``.

        Process 0 writes ``regroup-<epoch>.json`` (the ids of :meth:`plan_grow` and ``extra``,
        which every process of the new epoch reads as :attr:`joined_with`); every member then
        leaves and raises :class:`Regroup`. Save what must survive first.
        """
        m = self.membership
        renumber, joiners = self.plan_grow(tokens)
        if self.is_leader:
            for t in tokens:
                (self.rendezvous / f"join-{t}.json").unlink(missing_ok=True)
            _write_json(self.rendezvous / f"regroup-{m.epoch + 1}.json", dict(
                num_processes=len(renumber) + len(joiners), joiners=joiners,
                renumber={str(k): v for k, v in renumber.items()},
                extra=dict(extra, regroup_time=time.time())))
        self.agree(f"regroup/{m.epoch}", "written")  # the file exists before anyone leaves
        self._shutdown(sorted(renumber))
        self.membership = None
        raise Regroup(m.epoch + 1)

    # -- stopping ---------------------------------------------------------------------------

    def _shutdown(self, members: list[int]) -> None:
        """Leaves the epoch; process 0 goes last (its service must outlive the others)."""
        if self.is_leader:
            client, deadline = self._client(), time.monotonic() + 30
            others = [p for p in members if p != 0]
            while others and time.monotonic() < deadline:
                if set(client.get_live_nodes([0, *others])) <= {0}:
                    break
                time.sleep(0.02)
        jax.distributed.shutdown()

    def close(self) -> None:
        if self.distributed:
            self._shutdown(sorted({d.process_index for d in self.devices}))


def config_difference(mine: str, theirs: str, who: str) -> str:
    """The first fields in which two JSON configs differ, as text; empty if none."""
    a, b = _flatten(json.loads(mine)), _flatten(json.loads(theirs))
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} here, {b.get(k)!r} in {who}" for k in differ[:5])


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _cluster_detected() -> bool:
    """Whether ``jax.distributed.initialize()`` would find a cluster (SLURM, MPI, k8s, TPU)."""
    from jax._src import clusters

    return any(env.is_env_present() for env in clusters.ClusterEnv._cluster_types
               if env.__name__ not in ("SingleProcessCluster",))


def _enable_recovery(settings) -> None:
    jax.config.update("jax_enable_recoverability", True)
    flag = f"--xla_cpu_collective_timeout_seconds={settings.collective_timeout_seconds}"
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_collective_timeout_seconds" not in flags:  # read when the backend starts
        os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


def _initialize(m: Membership, settings) -> None:
    _enable_recovery(settings)
    jax.distributed.initialize(m.coordinator, m.num_processes, m.process_id,
                               initialization_timeout=settings.init_timeout_seconds,
                               heartbeat_timeout_seconds=settings.heartbeat_seconds)


def new_join_token() -> str:
    return uuid.uuid4().hex[:12]

