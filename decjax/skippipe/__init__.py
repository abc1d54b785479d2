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
from decjax.skippipe.simulate import (
    KINDS,
    PRIORITIES,
    REFERENCE_MEMORY,
    REFERENCE_TASK_GAP_S,
    Timeline,
    baseline_makespan,
    makespan,
    simulate,
)

__all__ = [
    "IO",
    "KINDS",
    "PRIORITIES",
    "REFERENCE_MEMORY",
    "REFERENCE_TASK_GAP_S",
    "RULES",
    "Schedule",
    "ScheduleError",
    "Timeline",
    "baseline_makespan",
    "full_pipeline_schedule",
    "legal_paths",
    "makespan",
    "path_length",
    "path_violations",
    "round_robin_schedule",
    "simulate",
    "stage_major_allocation",
    "validate",
    "violations",
]

from decjax.skippipe.train import (  # noqa: E402
    CHOICES,
    NORMALIZATIONS,
    eval_with_omitted_stages,
    kept_stages,
    make_skippipe_train_step,
    normalize_stage_grads,
    omitted_stage_route,
    rotating_schedules,
    visits_per_stage,
)

__all__ += [
    "CHOICES",
    "NORMALIZATIONS",
    "eval_with_omitted_stages",
    "kept_stages",
    "make_skippipe_train_step",
    "normalize_stage_grads",
    "omitted_stage_route",
    "rotating_schedules",
    "visits_per_stage",
]
