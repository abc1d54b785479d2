"""Lost stages inside replicated training: the trace, both rebuild rules, exactness, configs."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from decjax.train.replicated import ReplicatedConfig, init_replicas, train
from decjax.train.stage_failures import (
    block_bytes,
    failure_trace,
    lose_stage,
    peer_for,
    rebuild_lost,
)

TINY = dict(n_replicas=3, steps=12, global_batch=6, seq_len=16, d_model=16, n_heads=2,
            n_layers=4, d_ff=32, warmup_steps=1, sync_every=4, eval_every=6, eval_batches=1,
            eval_batch_size=4, max_bytes_per_domain=50_000, progress=False)


def drifted_replicas(method="noloco"):
    """Replicas whose every float leaf differs between replicas (as NoLoCo's drift apart)."""
    config = ReplicatedConfig(**TINY, method=method, stage_failure_rate=0.1)
    _, _, replicas = init_replicas(config, 256)
    keys = iter(jax.random.split(jax.random.key(0), 1000))
    return jax.tree.map(lambda x: x + jax.random.normal(next(keys), x.shape, x.dtype)
                        if np.issubdtype(x.dtype, np.floating) else x, replicas)


def leaves_of_block(tree, block):
    return [np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if f"['blocks'][{block}]" in jax.tree_util.keystr(p)]


def test_trace_hits_only_interior_blocks_and_depends_only_on_its_arguments():
    trace = failure_trace(4, 5, 200, 0.1, seed=3)
    assert trace == failure_trace(4, 5, 200, 0.1, seed=3)
    assert trace != failure_trace(4, 5, 200, 0.1, seed=4)
    lost = [x for pairs in trace.values() for x in pairs]
    assert 50 < len(lost) < 110  # about 0.1 * 4 * 200
    assert {b for _, b in lost} == {1, 2, 3} and {r for r, _ in lost} == {0, 1, 2, 3}
    assert failure_trace(4, 5, 200, 0.0, seed=3) == {}


def test_peer_copy_takes_the_whole_block_state_and_nothing_else():
    replicas = drifted_replicas()
    params, opt = lose_stage(tuple(replicas), 1, 2, block=2, rule="peer_copy")
    for before, after in ((replicas.params, params), (replicas.opt_state, opt)):
        for old, new in zip(leaves_of_block(before, 2), leaves_of_block(after, 2), strict=True):
            np.testing.assert_array_equal(new[1], old[2])
            np.testing.assert_array_equal(new[[0, 2]], old[[0, 2]])
        for block in (0, 1, 3):
            for old, new in zip(leaves_of_block(before, block), leaves_of_block(after, block),
                                strict=True):
                np.testing.assert_array_equal(new, old)
    # weights, Adam's two moments, the anchor and the momentum: 5 block-sized copies
    assert block_bytes(replicas.opt_state, 2) == 4 * block_bytes(replicas.params, 2)


def test_checkfree_averages_the_neighbours_with_fresh_state():
    replicas = drifted_replicas()
    params, opt = lose_stage(tuple(replicas), 0, 0, block=1, rule="checkfree")
    blocks = replicas.params["blocks"]
    want = jax.tree.map(lambda a, b: 0.5 * (a[0] + b[0]), blocks[0], blocks[2])
    jax.tree.map(lambda x, w: np.testing.assert_allclose(x[0], w, rtol=1e-6),
                 params["blocks"][1], want)
    jax.tree.map(lambda x, w: np.testing.assert_allclose(x[0], w, rtol=1e-6),
                 opt.anchor["blocks"][1], want)  # its own slow weights: the rebuilt ones
    for tree in (opt.outer, opt.inner):
        assert all(float(np.abs(x[0]).max()) == 0 for x in leaves_of_block(tree, 1))
        assert all(float(np.abs(x[1]).max()) > 0 for x in leaves_of_block(tree, 1))


def test_checkfree_weights_the_neighbours_by_their_gradient_norms():
    replicas = drifted_replicas()
    norms = np.ones((3, 4))
    norms[2, 3] = 3.0  # replica 2's right neighbour of block 2: weight 3 / 4
    (params, _), [event] = rebuild_lost(tuple(replicas), [(2, 2)], [0, 1, 2], "checkfree",
                                        norms)
    assert event["weight_right"] == pytest.approx(0.75, rel=1e-3)
    w, blocks = event["weight_right"], replicas.params["blocks"]
    jax.tree.map(lambda x, a, b: np.testing.assert_allclose(x[2], (1 - w) * a[2] + w * b[2],
                                                            rtol=1e-5, atol=1e-6),
                 params["blocks"][2], blocks[1], blocks[3])
    _, [event] = rebuild_lost(tuple(replicas), [(2, 2)], [0, 1, 2], "checkfree_uniform", norms)
    assert (event["recovery"], event["weight_right"]) == ("checkfree_uniform", 0.5)


def test_peer_for_skips_replicas_that_lost_the_same_block():
    assert peer_for([0, 1, 2, 3], 1, 2, [(1, 2)]) == 2
    assert peer_for([0, 1, 2, 3], 1, 2, [(1, 2), (2, 2)]) == 3
    assert peer_for([5, 7], 7, 1, [(7, 1), (5, 1)]) is None
    replicas = drifted_replicas()
    _, events = rebuild_lost(tuple(replicas), [(0, 1), (1, 1), (2, 1)], [0, 1, 2], "peer_copy",
                             np.ones((3, 4)))
    assert [e["recovery"] for e in events] == ["checkfree"] * 3  # nobody kept block 1


def test_data_parallel_peer_copy_is_exact():
    """DP replicas hold identical stages, so copying one loses nothing: the run equals the
    run without failures, while CheckFree's rebuild changes it."""
    base = ReplicatedConfig(**{**TINY, "sync_every": 0}, method="dp")
    plain = train(base)
    copied = train(dataclasses.replace(base, stage_failure_rate=0.3,
                                       stage_recovery="peer_copy"))
    rebuilt = train(dataclasses.replace(base, stage_failure_rate=0.3))
    assert copied.stage_failures == rebuilt.stage_failures > 3
    np.testing.assert_allclose(copied.val_loss_mean, plain.val_loss_mean, rtol=1e-6)
    assert abs(rebuilt.val_loss_mean[-1] - plain.val_loss_mean[-1]) > 1e-4


@pytest.mark.parametrize("fields, message", [
    (dict(stage_failure_rate=1.0), "stage_failure_rate=1.0 is not allowed"),
    (dict(stage_failure_rate=0.1, n_layers=2), "n_layers=2 is not allowed"),
    (dict(stage_recovery="restart"), "stage_recovery='restart' is not allowed"),
    (dict(stage_failure_rate=0.1, stage_recovery="peer_copy", n_replicas=1, global_batch=2),
     "needs n_replicas >= 2"),
])
def test_bad_stage_failure_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        ReplicatedConfig(**{**TINY, **fields})


def test_config_run_records_each_lost_stage(tmp_path):
    from configs import replicated
    from decjax.train.sweep import train_config

    config = replicated.get_config(
        f"size=tiny,replicas={len(jax.devices())},stages=3,failures=0.2,recovery=peer_copy")
    config.run.progress = False
    train_config(config, tmp_path)
    result = json.loads((tmp_path / "result.json").read_text())
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    lost = [e for e in events if e["event"] == "stage_failure"]
    assert result["stage_failures"] == len(lost) > 0
    assert all(e["block"] == 1 and e["recovery"] == "peer_copy" for e in lost)
    assert all(e["sim_recovery_seconds"] > 0 and e["weight_error"] >= 0 for e in lost)
    assert max(e["weight_error"] for e in lost) > 1e-3  # NoLoCo replicas differ
    assert np.isfinite(result["val_loss_mean"]).all()
