import numpy as np
import pytest

from decjax.sim.cost import (
    ComputeCost,
    activation_bytes,
    head_forward_flops,
    measure_flops_per_second,
    stage_forward_flops,
    stage_param_bytes,
)


def test_reference_constants():
    cost = ComputeCost.reference(n_stages=6, layers_per_stage=4, samples_per_microbatch=8)
    assert cost.n_stages == 6
    for s in range(6):
        assert cost.forward(s) == pytest.approx(1.76)
        assert cost.backward(s) == pytest.approx(2.64)
    assert cost.loss() == pytest.approx(0.44)


def test_stage_index_checked():
    cost = ComputeCost.reference(2, 1, 1)
    with pytest.raises(ValueError, match=r"stage must be in \[0, 2\)"):
        cost.forward(2)
    with pytest.raises(ValueError, match="stage"):
        cost.backward(-1)


def test_straggler_multipliers_have_mean_one():
    cost = ComputeCost.reference(1, 1, 1, straggler_sigma=0.5)
    draws = cost.sample(0, 100_000)
    assert draws.shape == (100_000,)
    assert np.all(draws > 0)
    assert draws.mean() == pytest.approx(1.0, abs=0.01)
    assert np.log(draws).std() == pytest.approx(0.5, rel=0.02)


def test_straggler_multipliers_are_seeded():
    cost = ComputeCost.reference(1, 1, 1, straggler_sigma=0.3)
    np.testing.assert_array_equal(cost.sample(7, (4, 3)), cost.sample(7, (4, 3)))
    assert not np.array_equal(cost.sample(7, (4, 3)), cost.sample(8, (4, 3)))
    rng = np.random.default_rng(7)
    np.testing.assert_array_equal(cost.sample(rng, (4, 3)), cost.sample(7, (4, 3)))


def test_sigma_zero_gives_exact_ones():
    cost = ComputeCost.reference(1, 1, 1)
    np.testing.assert_array_equal(cost.sample(1, (2, 5)), np.ones((2, 5)))


def test_sample_bad_arguments():
    cost = ComputeCost.reference(1, 1, 1, straggler_sigma=0.1)
    with pytest.raises(ValueError, match="rng_or_seed"):
        cost.sample("seed", 3)
    with pytest.raises(ValueError, match="shape"):
        cost.sample(0, (2, -1))
    with pytest.raises(ValueError, match="shape"):
        cost.sample(0, 1.5)


def test_invalid_compute_cost_fields():
    with pytest.raises(ValueError, match="forward_s"):
        ComputeCost(forward_s=np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="forward_s"):
        ComputeCost(forward_s=np.ones((2, 2)))
    with pytest.raises(ValueError, match="forward_s"):
        ComputeCost(forward_s=np.array([]))
    with pytest.raises(ValueError, match="backward_factor"):
        ComputeCost(forward_s=np.ones(2), backward_factor=-1.0)
    with pytest.raises(ValueError, match="straggler_sigma"):
        ComputeCost(forward_s=np.ones(2), straggler_sigma=float("nan"))
    with pytest.raises(ValueError, match="layers_per_stage"):
        ComputeCost.reference(2, 0, 8)


def test_from_flops_arithmetic():
    cost = ComputeCost.from_flops([2e12, 4e12], 1e12)
    np.testing.assert_allclose(cost.forward_s, [2.0, 4.0])
    assert cost.backward(1) == pytest.approx(8.0)
    assert cost.loss() == pytest.approx(0.25 * 3.0)
    # Head of 1.5e12 forward FLOPs: forward + backward = 3 * 1.5 s.
    with_head = ComputeCost.from_flops([2e12, 4e12], 1e12, head_flops=1.5e12)
    assert with_head.loss() == pytest.approx(4.5)
    with pytest.raises(ValueError, match="flops_per_second"):
        ComputeCost.from_flops([1.0], 0.0)
    with pytest.raises(ValueError, match="flops_per_microbatch_per_stage"):
        ComputeCost.from_flops([1.0, 0.0], 1.0)
    with pytest.raises(ValueError, match="head_flops"):
        ComputeCost.from_flops([1.0], 1.0, head_flops=1.0, loss_factor=0.5)


def test_stage_forward_flops_tiny_case():
    # d=2, f=3, T=4, 1 sample, 1 layer: per token 2*(4*4 + 3*2*3) + 2*4*2 = 68 + 16 = 84.
    assert stage_forward_flops(2, 1, 1, 3, 4, 1) == 4 * 84
    assert stage_forward_flops(2, 2, 3, 3, 4, 5) == 3 * 5 * 4 * 84
    with pytest.raises(ValueError, match="n_heads"):
        stage_forward_flops(6, 4, 1, 3, 4, 1)
    with pytest.raises(ValueError, match="seq_len"):
        stage_forward_flops(2, 1, 1, 3, 0, 1)


def test_head_flops_and_sizes():
    assert head_forward_flops(4, 10, 3, 2) == 2 * 4 * 10 * 6
    assert activation_bytes(1024, 1024, 1) == 4 * 2**20
    assert activation_bytes(1024, 1024, 8, bytes_per_value=2) == 16 * 2**20
    assert stage_param_bytes(2, 3, 2) == 4 * 2 * (16 + 18)
    with pytest.raises(ValueError, match="bytes_per_value"):
        activation_bytes(1024, 1024, 1, bytes_per_value=0)


def test_measure_flops_per_second():
    import jax
    import jax.numpy as jnp

    x = jnp.ones((64, 64), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    rate = measure_flops_per_second(matmul, x, flops=2 * 64**3, repeats=3)
    assert np.isfinite(rate) and rate > 0
    with pytest.raises(ValueError, match="repeats"):
        measure_flops_per_second(matmul, x, flops=1.0, repeats=0)
    with pytest.raises(ValueError, match="flops"):
        measure_flops_per_second(matmul, x, flops=-1.0)
