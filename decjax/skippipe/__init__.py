"""SkipPipe: partial and reordered pipelines, each microbatch on its own scheduled path.

Path rules and the per-iteration :class:`Schedule` (spec skippipe.md §2.2, §2.7), rule-abiding
schedules, a GCMA-style node allocation, the event-based makespan simulator, the
collision-aware planner with lower bounds, training along scheduled paths
(``Schedule.route()`` feeds ``StagedLlama``), and evaluation with omitted stages.
"""

from decjax.skippipe.allocation import (
    MAX_TSP_GROUPS,
    Allocation,
    aligned_pipeline_schedule,
    allocation_score,
    bottleneck_matching,
    gcma_allocation,
    round_robin_allocation,
    tsp_path,
)
from decjax.skippipe.builders import (
    full_pipeline_schedule,
    reference_plan,
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
from decjax.skippipe.scheduler import (
    cpsat_bound,
    exhaustive_plan,
    lower_bound,
    path_latency,
    plan,
    rotating_plans,
)
from decjax.skippipe.simulate import (
    KINDS,
    PRIORITIES,
    REFERENCE_MEMORY,
    REFERENCE_PARTITION,
    REFERENCE_TASK_GAP_S,
    Instance,
    Timeline,
    baseline_makespan,
    makespan,
    reference_instance,
    simulate,
)
from decjax.skippipe.train import (
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

__all__ = [
    "Allocation",
    "CHOICES",
    "IO",
    "Instance",
    "KINDS",
    "MAX_TSP_GROUPS",
    "NORMALIZATIONS",
    "PRIORITIES",
    "REFERENCE_MEMORY",
    "REFERENCE_PARTITION",
    "REFERENCE_TASK_GAP_S",
    "RULES",
    "Schedule",
    "ScheduleError",
    "Timeline",
    "aligned_pipeline_schedule",
    "allocation_score",
    "baseline_makespan",
    "bottleneck_matching",
    "cpsat_bound",
    "eval_with_omitted_stages",
    "exhaustive_plan",
    "full_pipeline_schedule",
    "gcma_allocation",
    "kept_stages",
    "legal_paths",
    "lower_bound",
    "make_skippipe_train_step",
    "makespan",
    "normalize_stage_grads",
    "omitted_stage_route",
    "path_latency",
    "path_length",
    "path_violations",
    "plan",
    "reference_instance",
    "reference_plan",
    "rotating_plans",
    "rotating_schedules",
    "round_robin_allocation",
    "round_robin_schedule",
    "simulate",
    "stage_major_allocation",
    "tsp_path",
    "validate",
    "violations",
    "visits_per_stage",
]
