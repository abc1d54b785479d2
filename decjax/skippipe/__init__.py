"""SkipPipe: partial and reordered pipelines, each microbatch on its own scheduled path.

Path rules and the per-iteration :class:`Schedule` (spec skippipe.md §2.2, §2.7), plus simple
rule-abiding schedules; ``Schedule.route()`` feeds ``StagedLlama.forward``.
"""

from decjax.skippipe.builders import (
    full_pipeline_schedule,
    round_robin_schedule,
    stage_major_allocation,
)
from decjax.skippipe.paths import (
    IO,
    RULES,
    Schedule,
    ScheduleError,
    legal_paths,
    path_length,
    path_violations,
    validate,
    violations,
)

__all__ = [
    "IO",
    "RULES",
    "Schedule",
    "ScheduleError",
    "full_pipeline_schedule",
    "legal_paths",
    "path_length",
    "path_violations",
    "round_robin_schedule",
    "stage_major_allocation",
    "validate",
    "violations",
]
