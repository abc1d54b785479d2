"""CheckFree / CheckFree+: rebuild a lost pipeline stage from its neighbours, no checkpoint.

Pure pieces (``plan_repairs`` on the host, ``apply_repairs`` / ``interpolate_stage`` jitted)
plus CheckFree+'s swapped routes. The trainer applies them on a shared failure trace
(``method.name="checkfree"`` or ``"checkfree_plus"``); see ``experiments/checkfree``.
"""

from decjax.checkfree.rules import (
    OPT_RULES,
    RULES,
    Repair,
    apply_repairs,
    checkfree_plus_routes,
    interpolate_stage,
    io_replica_overhead,
    neighbour_weight,
    plan_repairs,
    replace_stage,
    restore_io,
    swap_partner,
)

__all__ = [
    "OPT_RULES",
    "RULES",
    "Repair",
    "apply_repairs",
    "checkfree_plus_routes",
    "interpolate_stage",
    "io_replica_overhead",
    "neighbour_weight",
    "plan_repairs",
    "replace_stage",
    "restore_io",
    "swap_partner",
]
