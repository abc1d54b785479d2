"""Real processes: a launcher and a process group that survives kill -9 and lets members join.

* :mod:`decjax.dist.launch` — ``python -m decjax.launch --processes=N -- <command>``;
* :mod:`decjax.dist.group` — :class:`Group`: ``jax.distributed`` with recoverability, shrink
  over the live devices, grow by membership epochs;
* :mod:`decjax.dist.state` — moving per-replica state between epochs and copying a replica
  from a live peer.
"""

from decjax.dist.group import Group, default_dist_config, validate_dist_config
from decjax.dist.launch import LaunchError, launch, read_pids

__all__ = ["Group", "LaunchError", "default_dist_config", "launch", "read_pids",
           "validate_dist_config"]
