"""Tests for decjax.sim.failures: rate mapping, seeded generators, trace I/O and validation."""

import json
import math

import numpy as np
import pytest

from decjax.sim import failures as F


def _round_sig(x: float, digits: int = 1) -> float:
    """Rounds to ``digits`` significant figures, the precision of CheckFree's constants."""
    return round(x, digits - 1 - math.floor(math.log10(abs(x))))


def _four_sigma(n: int, p: float) -> float:
    return 4 * math.sqrt(n * p * (1 - p))


# -- rate mapping ---------------------------------------------------------------------------------

# (model, hourly rate, iteration seconds, CheckFree's hard-coded p_iter). The iteration times are
# the ones the constants imply; the reference is inconsistent between rates for 500M and 1.5B.
CHECKFREE_CONSTANTS = [
    ("124M", 0.10, 20.6, 0.0006),
    ("124M", 0.16, 20.6, 0.001),
    ("500M", 0.05, 63.0, 0.0009),
    ("500M", 0.10, 68.4, 0.002),
    ("500M", 0.16, 82.6, 0.004),
    ("500M", 0.33, 90.6, 0.01),
    ("1.5B", 0.10, 137.0, 0.004),
    ("1.5B", 0.16, 166.0, 0.008),
]


@pytest.mark.parametrize("model,hourly,seconds,expected", CHECKFREE_CONSTANTS)
def test_mapping_reproduces_checkfree_constants(model, hourly, seconds, expected):
    p = F.hourly_to_per_iteration(hourly, seconds)
    assert _round_sig(p, 1) == expected, (model, hourly, seconds, p)


def test_implied_iteration_seconds_hand_checked():
    # 3600 * ln(1 - 0.0006) / ln(0.9) = 3600 * 0.00060018 / 0.10536052 = 20.507 s.
    assert F.implied_iteration_seconds(0.10, 0.0006) == pytest.approx(20.507, abs=1e-3)
    # 3600 * ln(0.998) / ln(0.9) = 68.405 s and 3600 * ln(0.99) / ln(0.67) = 90.345 s.
    assert F.implied_iteration_seconds(0.10, 0.002) == pytest.approx(68.405, abs=1e-3)
    assert F.implied_iteration_seconds(0.33, 0.01) == pytest.approx(90.345, abs=1e-3)
    # The 124M time implied by the 10% constant also gives the 16% constant.
    t = F.implied_iteration_seconds(0.10, 0.0006)
    assert _round_sig(F.hourly_to_per_iteration(0.16, t), 1) == 0.001


def test_mapping_exact_values():
    assert F.hourly_to_per_iteration(0.5, 3600) == pytest.approx(0.5, rel=1e-12)
    assert F.hourly_to_per_iteration(0.75, 1800) == pytest.approx(0.5, rel=1e-12)
    assert F.hourly_to_per_iteration(0.0, 60) == 0.0
    # One hour of failures at h/hour is a Poisson process with rate -ln(1 - h) per hour.
    assert F.hourly_to_mtbf_seconds(1 - math.exp(-1)) == pytest.approx(3600.0)


@pytest.mark.parametrize("rate", [1.0, 1.5, -0.1, float("nan"), "high"])
def test_hourly_rate_outside_range_fails(rate):
    with pytest.raises(ValueError, match=r"hourly_rate.*\[0, 1\)"):
        F.hourly_to_per_iteration(rate, 60)


@pytest.mark.parametrize("seconds", [0, -5.0])
def test_nonpositive_iteration_seconds_fails(seconds):
    with pytest.raises(ValueError, match="iteration_seconds"):
        F.hourly_to_per_iteration(0.1, seconds)
    with pytest.raises(ValueError, match="iteration_seconds"):
        F.mtbf_trace(4, 10, 600, seconds, 0)


# -- Bernoulli / hourly -------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.002, 0.05])
def test_bernoulli_per_stage_rate_within_four_sigma(p):
    n_steps, n_stages = 10_000, 6
    trace = F.bernoulli_trace(n_stages, n_steps, p, seed=3)
    per_stage = np.bincount(trace.targets, minlength=n_stages)
    assert np.all(np.abs(per_stage - n_steps * p) <= _four_sigma(n_steps, p)), per_stage
    total = n_steps * n_stages
    assert abs(F.empirical_rate(trace) * total - total * p) <= _four_sigma(total, p)


def test_bernoulli_has_simultaneous_adjacent_failures():
    trace = F.bernoulli_trace(6, 2000, 0.3, seed=0)
    adjacent = [np.any(np.diff(trace.failures_at(s)) == 1) for s in range(trace.n_steps)]
    assert any(adjacent)


def test_same_seed_same_trace_and_csv_bytes(tmp_path):
    a = F.hourly_trace(6, 5000, 0.16, 20.6, seed=7)
    b = F.hourly_trace(6, 5000, 0.16, 20.6, seed=7)
    assert a == b and hash(a) == hash(b)
    a.to_csv(tmp_path / "a.csv")
    b.to_csv(tmp_path / "b.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    c = F.hourly_trace(6, 5000, 0.16, 20.6, seed=8)
    assert not a.same_events(c)


def test_hourly_trace_is_bernoulli_with_mapped_probability():
    p = F.hourly_to_per_iteration(0.33, 90.6)
    assert F.hourly_trace(5, 3000, 0.33, 90.6, seed=1).same_events(
        F.bernoulli_trace(5, 3000, p, seed=1)
    )


def test_generators_leave_global_rng_alone():
    np.random.seed(123)
    expected = np.random.random(3)
    np.random.seed(123)
    F.bernoulli_trace(4, 100, 0.1, seed=0)
    F.mtbf_trace(4, 100, 600, 60, seed=0)
    F.burst_trace(4, 100, 0.1, 2, seed=0)
    np.testing.assert_array_equal(np.random.random(3), expected)


def test_restrict_to_interior_removes_edge_stages():
    trace = F.bernoulli_trace(6, 2000, 0.05, seed=2)
    interior = F.interior_targets(6)
    np.testing.assert_array_equal(interior, [1, 2, 3, 4])
    restricted = trace.restrict(interior)
    assert set(np.unique(trace.targets)) == {0, 1, 2, 3, 4, 5}
    assert set(np.unique(restricted.targets)) == {1, 2, 3, 4}
    assert restricted.count() == np.count_nonzero((trace.targets >= 1) & (trace.targets <= 4))
    # Restricting eligibility at generation time keeps the other targets' draws unchanged.
    assert F.bernoulli_trace(6, 2000, 0.05, seed=2, targets=interior).same_events(restricted)
    rate = F.empirical_rate(restricted, interior)
    assert abs(rate * 8000 - 8000 * 0.05) <= _four_sigma(8000, 0.05)


# -- bursts ----------------------------------------------------------------------------------------


def test_adjacent_bursts_are_runs_of_neighbours():
    trace = F.burst_trace(8, 1000, 0.2, 3, seed=4)
    burst_steps = np.unique(trace.steps)
    assert 150 <= len(burst_steps) <= 250
    for step in burst_steps:
        failed = trace.failures_at(int(step))
        assert len(failed) == 3
        np.testing.assert_array_equal(np.diff(failed), [1, 1])
    # Every start 0..5 is used, so edge stages are hit too.
    assert set(trace.failures_at(int(s))[0] for s in burst_steps) == set(range(6))


def test_random_bursts_are_subsets():
    trace = F.burst_trace(8, 1000, 0.2, 3, seed=4, adjacent=False)
    sizes = {len(trace.failures_at(int(s))) for s in np.unique(trace.steps)}
    assert sizes == {3}
    gaps = [tuple(np.diff(trace.failures_at(int(s)))) for s in np.unique(trace.steps)]
    assert any(g != (1, 1) for g in gaps)
    with pytest.raises(ValueError, match="burst_size"):
        F.burst_trace(4, 10, 0.1, 5, seed=0)


# -- MTBF and joins --------------------------------------------------------------------------------


def test_mtbf_mean_time_between_failures():
    mtbf, t_iter, n_steps = 3600.0, 36.0, 200_000
    trace = F.mtbf_trace(6, n_steps, mtbf, t_iter, seed=5)
    gaps = np.concatenate([np.diff(trace.steps[trace.targets == t]) for t in range(6)])
    mean_seconds = gaps.mean() * t_iter
    # Gaps have sd ~ mtbf; two failures in one step count once, which biases up by ~t_iter / 2.
    assert abs(mean_seconds - mtbf) <= 4 * mtbf / math.sqrt(len(gaps)) + t_iter
    # Per step a target fails with probability 1 - exp(-t_iter / mtbf).
    q, total = -math.expm1(-t_iter / mtbf), 6 * n_steps
    assert abs(trace.count() - total * q) <= _four_sigma(total, q)


def test_mtbf_joins_follow_failures_after_downtime():
    downtime, n_steps = 5, 3000
    trace = F.mtbf_trace(4, n_steps, 1200, 60, seed=6, downtime_steps=downtime)
    assert trace.count("join") > 50
    for target in range(4):
        mine = [(s, k) for s, t, k in trace.events() if t == target]
        for (s0, k0), (s1, k1) in zip(mine, mine[1:], strict=False):
            if k0 == "fail":  # the next event is its rejoin, exactly `downtime` steps later
                assert (k1, s1 - s0) == ("join", downtime)
            else:  # after a join, a failure (possibly in the very same step)
                assert k1 == "fail" and s1 >= s0
        if mine[-1][1] == "fail":
            assert mine[-1][0] + downtime >= n_steps


def test_with_rejoins_drops_failures_while_down():
    steps, targets = [1, 2, 4, 6, 18], [0, 0, 0, 0, 1]
    base = F.FailureTrace(4, 20, steps=steps, targets=targets, kinds=["fail"] * 5)
    trace = F.with_rejoins(base, 3)
    assert trace.events() == [
        (1, 0, "fail"),
        (4, 0, "join"),
        (4, 0, "fail"),
        (7, 0, "join"),
        (18, 1, "fail"),
    ]
    assert trace.at(4) == [(0, "join"), (0, "fail")]
    with pytest.raises(ValueError, match="join events"):
        F.with_rejoins(trace, 3)
    with pytest.raises(ValueError, match="downtime_steps"):
        F.with_rejoins(base, 0)


# -- the trace container ---------------------------------------------------------------------------


def test_trace_sorts_and_indexes():
    trace = F.FailureTrace(
        5, 10, steps=[3, 0, 3, 9], targets=[4, 2, 1, 0], kinds=["fail", "fail", "join", "fail"]
    )
    assert trace.events() == [(0, 2, "fail"), (3, 1, "join"), (3, 4, "fail"), (9, 0, "fail")]
    assert trace.at(3) == [(1, "join"), (4, "fail")]
    assert trace.at(5) == []
    np.testing.assert_array_equal(trace.failures_at(3), [4])
    np.testing.assert_array_equal(trace.joins_at(3), [1])
    assert trace.failures_at(0).dtype == np.int64
    assert (len(trace), trace.count(), trace.count("join")) == (4, 3, 1)
    assert not trace.steps.flags.writeable
    with pytest.raises(ValueError, match="step=10"):
        trace.at(10)
    with pytest.raises(ValueError, match="kind='crash'"):
        trace.count("crash")


def test_at_matches_events_for_every_step():
    trace = F.bernoulli_trace(6, 500, 0.1, seed=9).merge(F.burst_trace(6, 500, 0.05, 2, seed=9))
    rebuilt = [(s, t, k) for s in range(trace.n_steps) for t, k in trace.at(s)]
    assert rebuilt == trace.events()


def test_trace_validation():
    with pytest.raises(ValueError, match=r"stage 7 but there are only 6 stages \(0\.\.5\)"):
        F.FailureTrace(6, 10, steps=[0], targets=[7], kinds=["fail"])
    with pytest.raises(ValueError, match=r"node 6 but there are only 6 nodes"):
        F.FailureTrace(6, 10, steps=[0], targets=[6], kinds=["fail"], target_kind="node")
    with pytest.raises(ValueError, match=r"step 10 but n_steps=10 allows steps 0\.\.9"):
        F.FailureTrace(6, 10, steps=[10], targets=[0], kinds=["fail"])
    with pytest.raises(ValueError, match="kinds has 'crash'"):
        F.FailureTrace(6, 10, steps=[0], targets=[0], kinds=["crash"])
    with pytest.raises(ValueError, match="duplicate event"):
        F.FailureTrace(6, 10, steps=[2, 2], targets=[1, 1], kinds=["fail", "fail"])
    with pytest.raises(ValueError, match="target_kind='rack'"):
        F.FailureTrace(6, 10, steps=[], targets=[], kinds=[], target_kind="rack")
    with pytest.raises(ValueError, match="steps must be a 1-D array of integers"):
        F.FailureTrace(6, 10, steps=[1.5], targets=[0], kinds=["fail"])
    with pytest.raises(ValueError, match="equal lengths"):
        F.FailureTrace(6, 10, steps=[1, 2], targets=[0], kinds=["fail"])
    with pytest.raises(ValueError, match="p_iter"):
        F.bernoulli_trace(6, 10, 1.5, seed=0)
    with pytest.raises(ValueError, match="seed"):
        F.bernoulli_trace(6, 10, 0.1, seed=-1)
    with pytest.raises(ValueError, match="targets: trace refers to stage 6"):
        F.bernoulli_trace(6, 10, 0.1, seed=0, targets=[1, 6])


def test_merge_and_restrict():
    a = F.FailureTrace(4, 10, steps=[1, 2], targets=[0, 1], kinds=["fail", "fail"], description="a")
    b = F.FailureTrace(4, 10, steps=[2, 5], targets=[1, 3], kinds=["fail", "join"], description="b")
    merged = a.merge(b)
    assert merged.events() == [(1, 0, "fail"), (2, 1, "fail"), (5, 3, "join")]
    assert merged.description == "a + b"
    assert merged.restrict([1, 3]).events() == [(2, 1, "fail"), (5, 3, "join")]
    with pytest.raises(ValueError, match="n_steps"):
        a.merge(F.FailureTrace(4, 11, steps=[], targets=[], kinds=[]))


def test_csv_round_trip_and_exact_bytes(tmp_path):
    trace = F.FailureTrace(6, 10, steps=[3, 0], targets=[2, 1], kinds=["join", "fail"])
    path = tmp_path / "trace.csv"
    trace.to_csv(path)
    assert path.read_bytes() == b"step,target,kind\n0,1,fail\n3,2,join\n"
    back = F.FailureTrace.from_csv(path, n_targets=6, n_steps=10)
    assert back.same_events(trace) and back.seed is None

    generated = F.mtbf_trace(6, 2000, 900, 60, seed=1, downtime_steps=4)
    generated.to_csv(path)
    assert F.FailureTrace.from_csv(path, n_targets=6, n_steps=2000).same_events(generated)


def test_csv_tolerates_comments_extra_columns_and_missing_kind(tmp_path):
    path = tmp_path / "spot.csv"
    path.write_text("# spot preemptions\nhost,step,target\n\nh1,4,0\nh2,2,3\n")
    trace = F.FailureTrace.from_csv(path, n_targets=4, n_steps=5, target_kind="node")
    assert trace.events() == [(2, 3, "fail"), (4, 0, "fail")]


def test_csv_errors_name_the_problem(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("step,target,kind\n0,1,fail\n4,7,fail\n")
    with pytest.raises(ValueError, match=r"bad\.csv: trace refers to stage 7 but there are only 6"):
        F.FailureTrace.from_csv(path, n_targets=6, n_steps=10)
    path.write_text("step,target,kind\n0,1,crash\n")
    with pytest.raises(ValueError, match="line 2: kind 'crash' is not allowed"):
        F.FailureTrace.from_csv(path, n_targets=6, n_steps=10)
    path.write_text("step,target,kind\nx,1,fail\n")
    with pytest.raises(ValueError, match="line 2: step 'x' is not an integer"):
        F.FailureTrace.from_csv(path, n_targets=6, n_steps=10)
    path.write_text("time,stage\n1,2\n")
    with pytest.raises(ValueError, match="no 'step' column"):
        F.FailureTrace.from_csv(path, n_targets=6, n_steps=10)


def test_json_round_trip():
    trace = F.burst_trace(6, 300, 0.1, 2, seed=11)
    data = json.loads(json.dumps(trace.to_json()))
    assert data["seed"] == 11 and data["events"][0][2] == "fail"
    assert F.FailureTrace.from_json(data) == trace
    data["events"][0][0] = 1.5
    with pytest.raises(ValueError, match="steps"):
        F.FailureTrace.from_json(data)
    with pytest.raises(ValueError, match="format"):
        F.FailureTrace.from_json({"events": []})


def test_summary_is_one_line():
    trace = F.hourly_trace(6, 1000, 0.1, 20.6, seed=0, target_kind="node")
    line = trace.summary()
    assert "\n" not in line
    assert f"{trace.count()} failures" in line and "6 nodes x 1000 steps" in line
    assert "seed 0" in line
