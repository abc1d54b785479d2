"""Starts, watches and replaces the processes of one run on this machine.

    python -m decjax.launch --processes=4 -- python -m decjax.train \\
        --config=configs/noloco.py:size=tiny --workdir=runs/noloco-4p

Every process gets the group's coordinator address, its id and the rendezvous folder in its
environment (:mod:`decjax.dist.group`). The launcher binds nothing but checks the port, keeps
each process's output in ``<log_dir>/process-<id>.log`` and the PIDs in
``<log_dir>/processes.json``, and ends every process it started, by PID, when the run ends,
fails or runs out of time. With ``respawn=k`` it starts up to ``k`` replacements for
processes that die, which join the running group.
"""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

from decjax.dist import group as group_lib

POLL_SECONDS = 0.05


class LaunchError(ValueError):
    """Bad launcher input, or a group that could not form."""


@dataclasses.dataclass
class Proc:
    rank: str  # "0", "1", ... or "join-<token>"
    popen: subprocess.Popen
    log: pathlib.Path
    started: float

    @property
    def pid(self) -> int:
        return self.popen.pid


def _check(processes: int, devices_per_process: int, respawn: int, port: int,
           ranks: list[int] | None) -> None:
    def need(ok, field, value, allowed):
        if not ok:
            raise LaunchError(f"{field}={value!r} is not allowed: {allowed}")

    need(isinstance(processes, int) and processes >= 1, "processes", processes,
         "an integer >= 1")
    need(isinstance(devices_per_process, int) and devices_per_process >= 1,
         "devices_per_process", devices_per_process, "an integer >= 1")
    need(isinstance(respawn, int) and respawn >= 0, "respawn", respawn, "an integer >= 0")
    need(isinstance(port, int) and 0 <= port < 65536, "port", port,
         "0 (pick a free one) or a port number below 65536")
    if ranks is not None:
        need(len(ranks) > 0 and all(0 <= r < processes for r in ranks)
             and len(set(ranks)) == len(ranks), "ranks", ranks,
             f"distinct process ids in [0, {processes})")


def _command(command: list[str]) -> list[str]:
    if not command:
        raise LaunchError("no command: put the training command after '--'")
    if command[0] in ("python", "python3"):  # the launcher's interpreter (its venv)
        command = [sys.executable, *command[1:]]
    return command


def _tail(path: pathlib.Path, lines: int = 15) -> str:
    if not path.exists():
        return "(no output)"
    kept = [line for line in path.read_text(errors="replace").splitlines()
            if not line.startswith("    @ ")]  # drop native stack frames
    return "\n".join(kept[-lines:])


def _describe_exit(rc: int) -> str:
    if rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    return f"exit code {rc}"


def launch(command: list[str], *, processes: int, log_dir: str | pathlib.Path, port: int = 0,
           host: str = "127.0.0.1", devices_per_process: int = 1, respawn: int = 0,
           timeout_s: float = 0, ranks: list[int] | None = None,
           env: dict[str, str] | None = None, quiet: bool = False) -> int:
    """Runs ``command`` as ``processes`` processes of one group; returns the exit code.

    Args:
      command: the training command (``python ...`` runs under this interpreter).
      processes: ``N >= 1``.
      log_dir: folder for the processes' logs, ``processes.json`` and the rendezvous files.
      port: the coordinator's port on ``host``; 0 picks a free one.
      host: the coordinator's host (process 0 runs there).
      devices_per_process: CPU devices each process gets (one replica each).
      respawn: how many replacements to start for processes that die.
      timeout_s: hard deadline for the whole run (0: none); past it every process is killed.
      ranks: start only these process ids here (the others run elsewhere); default all.
      env: extra environment for the processes.
      quiet: print nothing but errors.

    Returns:
      0 when process 0 finished cleanly (members lost on the way were survived); else
      process 0's exit code, 124 on timeout, or 1 when the group did not form.
    """
    _check(processes, devices_per_process, respawn, port, ranks)
    command = _command(command)
    if port and (ranks is None or 0 in ranks) and group_lib.port_in_use(host, port):
        raise LaunchError(f"port={port} on {host} is in use: pass another --port, or --port=0 "
                          "to pick a free one")
    port = port or group_lib.free_port(host)
    log_dir = pathlib.Path(log_dir)
    rendezvous = log_dir / "rendezvous"
    rendezvous.mkdir(parents=True, exist_ok=True)
    for stale in rendezvous.glob("*.json"):  # from an earlier launch into the same folder
        stale.unlink()
    base_env = {**os.environ, **(env or {}),
                group_lib.ENV_RENDEZVOUS: str(rendezvous.absolute()),
                "JAX_NUM_CPU_DEVICES": str(devices_per_process),
                "PYTHONUNBUFFERED": "1"}
    say = (lambda *_: None) if quiet else (lambda msg: print(f"[launch] {msg}", flush=True))
    procs: list[Proc] = []

    def start(rank: str, extra: dict[str, str]) -> Proc:
        log = log_dir / f"process-{rank}.log"
        with log.open("a") as out:
            popen = subprocess.Popen(command, env={**base_env, **extra}, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        proc = Proc(rank, popen, log, time.monotonic())
        procs.append(proc)
        group_lib._write_json(log_dir / "processes.json", {
            "pids": {p.rank: p.pid for p in procs if p.popen.poll() is None},
            "all_pids": [p.pid for p in procs]})
        return proc

    def start_epoch(epoch: int, n: int, local: list[int]) -> list[Proc]:
        address = f"{host}:{port if epoch == 0 else group_lib.free_port(host)}"
        return [start(str(rank), {group_lib.ENV_COORDINATOR: address,
                                  group_lib.ENV_NUM_PROCESSES: str(n),
                                  group_lib.ENV_PROCESS_ID: str(rank),
                                  group_lib.ENV_EPOCH: str(epoch)}) for rank in local]

    members = start_epoch(0, processes, ranks if ranks is not None else list(range(processes)))
    say(f"{processes} processes, coordinator {host}:{port}, logs in {log_dir}")
    deadline = time.monotonic() + timeout_s if timeout_s else None
    watch = _Watch(start, respawn, deadline, rendezvous, say)
    try:
        epoch = 0
        while True:
            rc = watch.epoch(members, epoch, processes)
            if rc != group_lib.REGROUP_EXIT_CODE:
                return rc
            epoch += 1
            plan = json.loads((rendezvous / f"regroup-{epoch}.json").read_text())
            processes = plan["num_processes"]
            members = start_epoch(epoch, processes, list(range(processes)))
            say(f"epoch {epoch}: restarted the group as {processes} processes "
                f"({len(plan['joiners'])} joining)")
    finally:
        for proc in procs:  # every process this launcher started ends with it, by PID
            if proc.popen.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.popen.wait()


class _Watch:
    """Watches one epoch's processes (and replacements) until process 0 ends."""

    def __init__(self, start, respawn, deadline, rendezvous, say):
        self.start, self.respawn, self.deadline = start, respawn, deadline
        self.rendezvous, self.say, self.replacements = rendezvous, say, 0

    def _ready(self, epoch: int, rank: str) -> bool:
        return (self.rendezvous / f"ready-{epoch}-{rank}.json").exists()

    def epoch(self, members: list[Proc], epoch: int, processes: int) -> int:
        procs, done = list(members), set()
        while True:
            if self.deadline is not None and time.monotonic() > self.deadline:
                alive = [p.rank for p in procs if p.popen.poll() is None]
                print(f"[launch] error: the run passed its deadline; killing processes {alive}",
                      file=sys.stderr, flush=True)
                return 124
            for proc in list(procs):
                rc = proc.popen.poll()
                if rc is None or proc.pid in done:
                    continue
                done.add(proc.pid)
                if proc.rank == "0":
                    return self._leader_exit(proc, rc, procs, epoch, processes)
                if rc in (0, group_lib.REGROUP_EXIT_CODE):
                    continue
                if not proc.rank.startswith("join") and not self._ready(epoch, proc.rank):
                    print(f"[launch] error: process {proc.rank} stopped before the group "
                          f"formed ({_describe_exit(rc)}):\n{_tail(proc.log)}",
                          file=sys.stderr, flush=True)
                    return 1
                self.say(f"process {proc.rank} (pid {proc.pid}) lost: {_describe_exit(rc)}")
                if self.replacements < self.respawn:
                    self.replacements += 1
                    token = group_lib.new_join_token()
                    procs.append(self.start(f"join-{token}", {group_lib.ENV_JOIN: token}))
                    self.say(f"started replacement {procs[-1].rank} (pid {procs[-1].pid})")
            time.sleep(POLL_SECONDS)

    def _leader_exit(self, proc: Proc, rc: int, procs: list[Proc], epoch: int,
                     processes: int) -> int:
        if rc not in (0, group_lib.REGROUP_EXIT_CODE):
            if not self._ready(epoch, "0"):
                missing = [r for r in range(1, processes) if not self._ready(epoch, str(r))]
                why = (f"processes {missing} never arrived (started elsewhere? check that they "
                       "run and can reach the coordinator); " if missing and rc < 0 else "")
                print(f"[launch] error: the group did not form: {why}process 0 stopped with "
                      f"{_describe_exit(rc)}:\n{_tail(proc.log)}", file=sys.stderr, flush=True)
                return 1
            print(f"[launch] error: process 0 ({_describe_exit(rc)}); it hosts the "
                  f"coordinator, so the run ends with it:\n{_tail(proc.log)}",
                  file=sys.stderr, flush=True)
            return rc if rc > 0 else 1
        end = time.monotonic() + 30  # the others finish their shutdown (or leave to regroup)
        while time.monotonic() < end and any(p.popen.poll() is None for p in procs):
            time.sleep(POLL_SECONDS)
        for p in procs:
            if p.popen.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.popen.wait()
            elif p.popen.returncode not in (0, group_lib.REGROUP_EXIT_CODE) and \
                    p.popen.returncode > 0:
                print(f"[launch] process {p.rank} ended with "
                      f"{_describe_exit(p.popen.returncode)}:\n{_tail(p.log)}",
                      file=sys.stderr, flush=True)
        if rc == 0:
            self.say("done")
        return rc


def main_argv(argv: list[str]) -> list[str]:
    """The command after ``--`` (absl keeps it in ``argv``)."""
    rest = argv[1:]
    return rest[1:] if rest and rest[0] == "--" else rest


def read_pids(log_dir: str | pathlib.Path) -> dict:
    """``{"pids": {rank: pid} of the running processes, "all_pids": [...]}`` as last written."""
    path = pathlib.Path(log_dir) / "processes.json"
    return json.loads(path.read_text()) if path.exists() else {"pids": {}, "all_pids": []}
