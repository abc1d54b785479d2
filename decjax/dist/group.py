"""A group of JAX processes that survives the loss of a member and lets a replacement join.

The group runs on ``jax.distributed`` (XLA's coordination service in process 0; Gloo
collectives on CPU, NCCL on GPU) with recoverability on, so a dead process does not take the
others with it. Membership changes in two ways:

* **shrink** — a step that touches a dead process raises ``ProcessFailureError`` on every
  survivor at once (``multihost_utils.live_devices`` is atomic); the survivors agree on the
  live devices and carry on over them in the same epoch;
* **grow** — a replacement asks to join through the *rendezvous folder*; at the next check
  the members tear the runtime down and start a new **epoch**: a fresh coordination service
  on a new port, the survivors first (in their old order, so process 0 stays 0), then the
  joiners. A re-formed Gloo group cannot reuse device keys of a dead member
  (``ALREADY_EXISTS``), a fresh epoch can. State stays in the survivors' host memory across
  the switch; no process restarts and nothing is read from disk.

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
                 rendezvous: pathlib.Path | None, joined_with: dict | None = None):
        self.membership, self.settings, self.rendezvous = membership, settings, rendezvous
        self.joined_with = joined_with  # what the group told a replacement when it let it in
        self.devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
        self.dead_processes: set[int] = set()

    # -- starting -----------------------------------------------------------------------

    @classmethod
    def connect(cls, settings: ml_collections.ConfigDict) -> "Group":
        """Joins the group this process was started for (launcher, cluster, or alone)."""
        validate_dist_config(settings)
        rendezvous = os.environ.get(ENV_RENDEZVOUS)
        rendezvous = pathlib.Path(rendezvous) if rendezvous else None
        if os.environ.get(ENV_JOIN):
            return cls._join(settings, rendezvous, os.environ[ENV_JOIN])
        if ENV_COORDINATOR in os.environ:
            membership = Membership(0, int(os.environ[ENV_PROCESS_ID]),
                                    int(os.environ[ENV_NUM_PROCESSES]),
                                    os.environ[ENV_COORDINATOR])
            _initialize(membership, settings)
        elif _cluster_detected():
            _enable_recovery(settings)
            jax.distributed.initialize(initialization_timeout=settings.init_timeout_seconds,
                                       heartbeat_timeout_seconds=settings.heartbeat_seconds)
            membership = Membership(0, jax.process_index(), jax.process_count(),
                                    _jax_distributed.global_state.coordinator_address)
        else:
            membership = None
        group = cls(membership, settings, rendezvous)
        group._mark_ready()
        return group

    @classmethod
    def _join(cls, settings, rendezvous: pathlib.Path | None, token: str) -> "Group":
        """A replacement: asks to join, waits for the epoch that lets it in, initialises."""
        if rendezvous is None:
            raise RuntimeError(f"{ENV_JOIN} is set but {ENV_RENDEZVOUS} is not: a replacement "
                               "needs the group's rendezvous folder")
        _write_json(rendezvous / f"join-{token}.json", {"token": token, "pid": os.getpid()})
        deadline = time.monotonic() + settings.join_timeout_seconds
        while time.monotonic() < deadline:
            for path in sorted(rendezvous.glob("epoch-*.json")):
                epoch = json.loads(path.read_text())
                if token in epoch["joiners"]:
                    membership = Membership(epoch["epoch"], epoch["joiners"][token],
                                            epoch["num_processes"], epoch["coordinator"])
                    _initialize(membership, settings)
                    group = cls(membership, settings, rendezvous, joined_with=epoch["extra"])
                    group._mark_ready()
                    return group
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

    def check_same_config(self, config_json: str) -> None:
        """Every member must run the same config; raises naming the fields that differ."""
        if not self.distributed:
            return
        client = self._client()
        epoch = self.membership.epoch
        client.key_value_set(f"decjax/{epoch}/config/{self.process_id}", config_json)
        timeout = int(self.settings.init_timeout_seconds * 1000)
        mine = _flatten(json.loads(config_json))
        for d in self.devices:
            other = d.process_index
            if other == self.process_id:
                continue
            theirs = _flatten(json.loads(
                client.blocking_key_value_get(f"decjax/{epoch}/config/{other}", timeout)))
            differ = sorted(k for k in mine.keys() | theirs.keys()
                            if k not in ("workdir",) and mine.get(k) != theirs.get(k))
            if differ:
                shown = ", ".join(f"{k}: {mine.get(k)!r} here, {theirs.get(k)!r} in process "
                                  f"{other}" for k in differ[:5])
                raise ValueError(f"the processes were started with different configs ({shown}); "
                                 "start every process with the same config")

    # -- growing ----------------------------------------------------------------------------

    def pending_joins(self, step: int) -> list[str]:
        """Join requests to admit now; decided by process 0, the same list on every member."""
        if (not self.distributed or not self.settings.join_check_every or self.rendezvous is None
                or step % self.settings.join_check_every):
            return []
        tokens = ""
        if self.is_leader:
            tokens = ",".join(sorted(p.stem.removeprefix("join-")
                                     for p in self.rendezvous.glob("join-*.json")))
        tokens = self.agree(f"joins/{step}", tokens)
        return [t for t in tokens.split(",") if t]

    def grow(self, tokens: list[str], extra: dict) -> dict[str, int]:
        """Starts a new epoch with the live members and the joiners ``tokens``.

        All JAX arrays of this process are invalid afterwards: copy what must survive to host
        memory first. ``extra`` (JSON) reaches the joiners as :attr:`joined_with`.

        Returns:
          The joiners' new process ids, by token.
        """
        m = self.membership
        survivors = sorted({d.process_index for d in self.devices})
        new_id = survivors.index(m.process_id)
        host = m.coordinator.rsplit(":", 1)[0]
        port = int(self.agree(f"grow/{m.epoch}/port", str(free_port(host)) if self.is_leader
                              else None))
        joiners = {t: len(survivors) + i for i, t in enumerate(tokens)}
        n_new = len(survivors) + len(tokens)
        self._shutdown(survivors)
        import jax.extend.backend

        jax.extend.backend.clear_backends()
        coordinator = f"{host}:{port}"
        if self.is_leader:
            for t in tokens:
                (self.rendezvous / f"join-{t}.json").unlink(missing_ok=True)
            _write_json(self.rendezvous / f"epoch-{m.epoch + 1}.json", dict(
                epoch=m.epoch + 1, coordinator=coordinator, num_processes=n_new,
                joiners=joiners, extra=extra))
        self.membership = Membership(m.epoch + 1, new_id, n_new, coordinator)
        _initialize(self.membership, self.settings)
        self.devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
        self.dead_processes = set()
        self._mark_ready()
        return joiners

    # -- stopping ---------------------------------------------------------------------------

    def _shutdown(self, members: list[int]) -> None:
        """Leaves the epoch; process 0 goes last (its service must outlive the others)."""
        if self.is_leader:
            client, deadline = self._client(), time.monotonic() + 30
            others = [p for p in members if p != 0]
            while others and time.monotonic() < deadline:
                if set(client.get_live_nodes(others)) == set():
                    break
                time.sleep(0.02)
        jax.distributed.shutdown()

    def close(self) -> None:
        if self.distributed:
            self._shutdown(sorted({d.process_index for d in self.devices}))


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

