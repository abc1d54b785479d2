"""GCMA-style allocation: exact TSP and bottleneck matching, search quality, aligned baseline."""

import itertools

import numpy as np
import pytest

from decjax.sim import ComputeCost, Network, Placement
from decjax.skippipe import (
    IO,
    REFERENCE_PARTITION,
    baseline_makespan,
    makespan,
    reference_instance,
    round_robin_schedule,
    stage_major_allocation,
    validate,
)
from decjax.skippipe.allocation import (
    aligned_pipeline_schedule,
    allocation_score,
    bottleneck_matching,
    gcma_allocation,
    round_robin_allocation,
    tsp_path,
)

ALLOC, PLACE, COST, NBYTES = reference_instance()
FAST = dict(max_evaluations=400, time_budget_s=120)  # the cap, not the clock, ends the search


def brute_tsp(w, start, closed, kinds):
    others = [c for c in range(len(w)) if c != start]
    best = None
    for perm in itertools.permutations(others):
        order = [start, *perm]
        if [kinds[c] for c in order] != list(kinds):
            continue
        cost = sum(w[a][b] for a, b in itertools.pairwise(order))
        cost += w[order[-1]][start] if closed and len(w) > 1 else 0.0
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("typed", [False, True])
@pytest.mark.parametrize("closed", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_tsp_equals_brute_force(n, closed, typed):
    rng = np.random.default_rng(n)
    for _ in range(5):
        w = rng.uniform(0, 10, (n, n))  # asymmetric on purpose
        kinds = rng.integers(0, 2, n).tolist() if typed else [0] * n
        start = int(rng.choice([c for c in range(n) if kinds[c] == kinds[0]]))
        cost, order = tsp_path(w, start=start, closed=closed, kinds=kinds if typed else None)
        assert cost == pytest.approx(brute_tsp(w, start, closed, kinds))
        assert order[0] == start and sorted(order) == list(range(n))
        assert [kinds[c] for c in order] == kinds
        again = sum(w[a][b] for a, b in itertools.pairwise(order))
        assert cost == pytest.approx(again + (w[order[-1]][start] if closed and n > 1 else 0))


def brute_bottleneck(w):
    rows, cols = w.shape
    if rows > cols:
        return brute_bottleneck(w.T)
    return min(max(w[r, c] for r, c in enumerate(p))
               for p in itertools.permutations(range(cols), rows))


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (5, 3), (3, 5), (4, 4), (2, 6)])
def test_bottleneck_matching_equals_brute_force(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(10):
        w = rng.integers(0, 6, shape).astype(float)  # many ties
        value, pairs = bottleneck_matching(w)
        assert value == brute_bottleneck(w)
        assert len(pairs) == min(shape)
        assert len({r for r, _ in pairs}) == len({c for _, c in pairs}) == min(shape)
        assert max(w[r, c] for r, c in pairs) == value


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="NaN"):
        bottleneck_matching([[np.nan]])
    with pytest.raises(ValueError, match="weights"):
        tsp_path(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="sum"):
        gcma_allocation(PLACE, [5, 3, 3], COST, activation_bytes=NBYTES)
    with pytest.raises(ValueError, match="pipelines"):
        aligned_pipeline_schedule(ALLOC, [[5, 0, 1, 2, 3, 4]], 3)  # node 5 is not io


@pytest.fixture(scope="module")
def reference_gcma():
    return gcma_allocation(PLACE, REFERENCE_PARTITION, COST, activation_bytes=NBYTES, **FAST)


def test_never_worse_than_stage_major_and_round_robin(reference_gcma):
    g = reference_gcma
    for alloc in (stage_major_allocation(REFERENCE_PARTITION),
                  round_robin_allocation(REFERENCE_PARTITION)):
        assert g.score <= allocation_score(PLACE, alloc, COST, activation_bytes=NBYTES)[0]
    score, dp, pp = allocation_score(PLACE, g.allocation, COST, activation_bytes=NBYTES)
    assert (score, dp, pp) == pytest.approx((g.score, g.dp_cost, g.pp_cost))
    assert g.score == pytest.approx(g.dp_cost + 2 * g.pp_cost)
    assert g.evaluations <= FAST["max_evaluations"]


@pytest.mark.parametrize("sizes", [REFERENCE_PARTITION, (6, 4, 4, 4), (2, 3, 1, 2)])
def test_partition_sizes_respected(sizes):
    _, place, cost, _ = reference_instance(sizes)
    g = gcma_allocation(place, sizes, cost, activation_bytes=NBYTES, max_evaluations=150)
    counts = np.bincount(g.allocation - IO, minlength=len(sizes))
    assert counts.tolist() == list(sizes)
    assert g.pipelines.shape == (min(sizes), len(sizes))
    assert np.unique(g.pipelines).size == g.pipelines.size  # a node serves one pipeline
    assert (g.allocation[g.pipelines] == np.arange(IO, len(sizes) - 1)).all()


def test_round_robin_allocation():
    assert round_robin_allocation([2, 1, 2]).tolist() == [IO, 0, 1, IO, 1]


def test_deterministic_for_a_seed(reference_gcma):
    again = gcma_allocation(PLACE, REFERENCE_PARTITION, COST, activation_bytes=NBYTES, **FAST)
    assert again.allocation.tolist() == reference_gcma.allocation.tolist()
    assert again.pipelines.tolist() == reference_gcma.pipelines.tolist()
    assert again.score == reference_gcma.score


def test_score_ignores_stage_labels():
    relabelled = np.where(ALLOC >= 0, (ALLOC + 2) % 5, ALLOC)
    assert allocation_score(PLACE, relabelled, COST, activation_bytes=NBYTES) == \
        pytest.approx(allocation_score(PLACE, ALLOC, COST, activation_bytes=NBYTES))


def two_clusters(n_nodes):
    """Regions a0, a1 near each other, b0, b1 near each other, a far from b; node ``k`` in
    cluster ``k % 2``, alternating between its two regions."""
    lat, bw = np.full((4, 4), 0.2), np.full((4, 4), 1e8)
    lat[:2, :2] = lat[2:, 2:] = 0.001
    bw[:2, :2] = bw[2:, 2:] = 1e10
    net = Network(("a0", "a1", "b0", "b1"), lat, bw)
    k = np.arange(n_nodes)
    return Placement(net, 2 * (k % 2) + (k // 2) % 2)


@pytest.mark.parametrize("sizes", [(3, 3), (2, 2, 2, 2), (4, 2, 2)])
def test_two_clusters_are_grouped(sizes):
    """With all-reduce bytes far above activation bytes, no stage may straddle the clusters.

    (With ``stage_param_bytes=None``, as in the reference, mixed stages win here: the tour then
    pairs nodes within each cluster and only the DP term pays the far link.)
    """
    place = two_clusters(sum(sizes))
    cost = ComputeCost.reference(len(sizes) - 1, layers_per_stage=1, samples_per_microbatch=1)
    g = gcma_allocation(place, sizes, cost, activation_bytes=1e6, stage_param_bytes=1e8,
                        max_evaluations=300)
    cluster = place.node_regions // 2
    for s in range(IO, len(sizes) - 1):
        assert np.unique(cluster[g.allocation == s]).size == 1, g.allocation
    # each closed pipeline (p = 0 compares io with the last stage) crosses over only twice
    for pipe in cluster[g.pipelines]:
        assert sum(pipe[p] != pipe[p - 1] for p in range(len(sizes))) == 2


def test_aligned_baseline_validates_and_beats_stage_major(reference_gcma):
    g = reference_gcma
    full = aligned_pipeline_schedule(g.allocation, g.pipelines, 30)
    validate(full, n_stages=5, skip_ratio=0)
    assert np.bincount(full.io_node, minlength=20)[g.pipelines[:, 0]].tolist() == [10, 10, 10]
    ours = makespan(full, PLACE, COST, activation_bytes=NBYTES).seconds
    stage_major = baseline_makespan(round_robin_schedule(ALLOC, 30, 1 / 3), PLACE, COST,
                                    activation_bytes=NBYTES).seconds
    assert 0 < ours < stage_major
