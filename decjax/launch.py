"""Runs one training command as N processes of a group on this machine.

    python -m decjax.launch --processes=4 -- python -m decjax.train \
        --config=configs/noloco.py:size=tiny --workdir=runs/noloco-4p
    python -m decjax.launch --processes=4 --respawn=1 -- ...   # replace a process that dies

On a cluster, start the training command itself once per host (SLURM ``srun``, ``mpirun``, a
Kubernetes JobSet): ``jax.distributed.initialize()`` detects the cluster (see the README).
"""

import sys

from absl import app, flags

from decjax.dist.launch import LaunchError, launch, main_argv

_PROCESSES = flags.DEFINE_integer("processes", 2, "Number of processes (N >= 1).")
_PORT = flags.DEFINE_integer("port", 0, "Coordinator port; 0 picks a free one.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Coordinator host (where process 0 runs).")
_DEVICES = flags.DEFINE_integer("devices_per_process", 1, "CPU devices (replicas) per process.")
_RESPAWN = flags.DEFINE_integer("respawn", 0, "Replacements to start for processes that die.")
_TIMEOUT = flags.DEFINE_float("timeout_s", 0, "Hard deadline for the run in seconds (0: none).")
_RANKS = flags.DEFINE_list("ranks", None, "Start only these process ids here (default: all).")
_LOGS = flags.DEFINE_string("logs", "runs/launch", "Folder for the processes' logs and PIDs.")


def main(argv):
    try:
        ranks = None if _RANKS.value is None else [int(r) for r in _RANKS.value]
        sys.exit(launch(main_argv(argv), processes=_PROCESSES.value, port=_PORT.value,
                        host=_HOST.value, devices_per_process=_DEVICES.value,
                        respawn=_RESPAWN.value, timeout_s=_TIMEOUT.value, ranks=ranks,
                        log_dir=_LOGS.value))
    except LaunchError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main)
