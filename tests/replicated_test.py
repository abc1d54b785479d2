"""Replicated training: a few steps of each method on a tiny model, checking real properties."""

import jax
import numpy as np
import pytest

from decjax.train.replicated import (
    METHODS,
    ReplicatedConfig,
    init_replicas,
    load_run_data,
    make_train_step,
    replica_batches,
    train,
)

TINY = dict(n_replicas=4, global_batch=8, seq_len=16, d_model=32, n_heads=2, n_layers=1,
            d_ff=64, lr=1e-2, warmup_steps=2, eval_every=10, eval_batches=2,
            eval_batch_size=8, max_bytes_per_domain=20_000, progress=False)


@pytest.fixture(scope="module")
def data():
    return load_run_data(ReplicatedConfig(**TINY))


def _spread_per_leaf(params_R):
    """Largest difference between any replica and replica 0, over all leaves."""
    return max(float(np.abs(x - x[:1]).max()) for x in jax.tree.leaves(params_R))


def _steps(config, data):
    """Yields the replicas' parameters after every step."""
    graphdef, tx, replicas = init_replicas(config, data.vocab_size)
    step = make_train_step(graphdef, tx, config.method)
    batches = replica_batches(data, config)
    for _ in range(config.steps):
        replicas, _, _ = step(replicas, next(batches))
        yield replicas.params


def test_replicas_read_own_shards_in_independent_orders(data):
    config = ReplicatedConfig(method="dp", steps=2, **TINY)
    row_indices = {}  # short byte rows repeat, so a row may sit at several indices
    for i, row in enumerate(data.train):
        row_indices.setdefault(row.tobytes(), []).append(i)
    batch = next(replica_batches(data, config))
    # Shard r is rows r::4: take each row's index inside replica r's shard.
    index_RB = np.array([[min(i for i in row_indices[row.tobytes()] if i % 4 == r)
                          for row in rows] for r, rows in enumerate(batch)])
    # Not neighbouring rows (one stretch of one document) at the same position.
    assert not np.all(np.diff(index_RB, axis=0) == 1)


def test_data_parallel_replicas_are_one_model_every_step(data):
    config = ReplicatedConfig(method="dp", steps=3, **TINY)
    for params in _steps(config, data):
        assert _spread_per_leaf(params) == 0.0


@pytest.mark.parametrize("method", ["diloco", "diloco_nesterov"])
def test_diloco_replicas_meet_at_every_sync_and_drift_between(method, data):
    config = ReplicatedConfig(**(TINY | dict(method=method, steps=4, sync_every=2,
                                             warmup_steps=0)))  # lr 0 would hide step 1
    spreads = [_spread_per_leaf(params) for params in _steps(config, data)]
    assert spreads[0] > 1e-4 and spreads[2] > 1e-4  # own shards between syncs
    # Right after a sync every replica sits on the shared anchor (up to float32 rounding of
    # params + (anchor - params)).
    assert spreads[1] < 1e-6 and spreads[3] < 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_every_method_lowers_the_validation_loss(method, data):
    sync_every = 0 if method == "dp" else 5
    result = train(ReplicatedConfig(method=method, steps=20, sync_every=sync_every, **TINY), data)
    assert result.eval_steps == [0, 10, 20]
    assert result.val_loss_mean[-1] < result.val_loss_mean[0] - 1.0
    assert result.val_loss_averaged[-1] < result.val_loss_averaged[0] - 1.0
    assert len(result.train_loss) == 20 and len(result.final_replica_losses) == 4
    assert result.outer_steps == (0 if method == "dp" else 4)
    if method == "noloco":  # pairs average, but no replica ever sees all the others
        assert result.spread[-1] > 1e-4
        assert len(set(result.final_replica_losses)) == 4
    else:  # one model at the end (dp always, DiLoCo because 20 is a multiple of H)
        assert result.spread[-1] < 1e-6


@pytest.mark.parametrize("changes,message", [
    (dict(method="fsdp"), r"ReplicatedConfig.method='fsdp' is not allowed: one of dp, diloco"),
    (dict(global_batch=30), r"ReplicatedConfig.global_batch=30 is not allowed: a multiple of "
                            r"n_replicas=4"),
    (dict(method="noloco", n_replicas=0), r"ReplicatedConfig.n_replicas=0"),
    (dict(method="dp", sync_every=10), r"ReplicatedConfig.sync_every=10"),
    (dict(steps=0), r"ReplicatedConfig.steps=0 is not allowed: a positive integer"),
    (dict(lr=-1.0), r"ReplicatedConfig.lr=-1.0 is not allowed"),
    (dict(n_heads=3), r"ReplicatedConfig.n_heads=3 is not allowed"),
])
def test_config_errors_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        ReplicatedConfig(**(TINY | changes))


def test_the_replicated_config_trains_alone_like_the_vmap_run_and_keeps_a_finished_run(
        tmp_path):
    import json

    from configs import noloco
    from decjax.train import validate
    from decjax.train.config import ConfigError
    from decjax.train.distributed import run_config
    from decjax.train.distributed import train as train_distributed

    config = noloco.get_config(f"size=tiny,replicas={len(jax.devices())}")
    config.run.steps, config.run.progress = 6, False
    validate(config)
    result = train_distributed(run_config(config), config.dist, tmp_path)
    alone = train(run_config(config))
    np.testing.assert_allclose(result["train_loss"], alone.train_loss, atol=1e-6)
    assert json.loads((tmp_path / "result.json").read_text()) == result
    before = (tmp_path / "result.json").read_bytes()
    with pytest.raises(ValueError, match="already holds a finished run"):
        train_distributed(run_config(config), config.dist, tmp_path)
    assert (tmp_path / "result.json").read_bytes() == before
    config.run.unlocked = 1  # an unknown field
    with pytest.raises(ConfigError, match="unexpected keyword argument 'unlocked'"):
        validate(config)


def test_a_lone_run_with_more_replicas_than_devices_names_the_fix(tmp_path):
    from configs import noloco
    from decjax.train.distributed import run_config
    from decjax.train.distributed import train as train_distributed

    config = noloco.get_config(f"size=tiny,replicas={2 * len(jax.devices())}")
    with pytest.raises(ValueError, match=f"JAX_NUM_CPU_DEVICES={2 * len(jax.devices())}"):
        train_distributed(run_config(config), config.dist, tmp_path)


def test_train_workdir_writes_a_record_the_sweep_reuses(tmp_path):
    import json

    from configs import noloco
    from decjax.train.replicated import RunResult, train_workdir
    from decjax.train.sweep import sweep

    config = noloco.get_config("size=tiny,replicas=3")  # not the device count: vmapped
    config.run.steps, config.run.progress = 4, False
    calls = []

    def counted(config, workdir):
        calls.append(workdir)
        return train_workdir(config, workdir)

    workdirs = sweep({"run": config}, tmp_path, train=counted, progress=False)
    result = RunResult(**json.loads((workdirs["run"] / "result.json").read_text()))
    assert len(result.final_replica_losses) == 3 and np.isfinite(result.val_loss_mean).all()
    val = [json.loads(line) for line in (workdirs["run"] / "metrics.jsonl").open()]
    assert [r["loss"] for r in val] == result.val_loss_mean
    sweep({"run": config}, tmp_path, train=counted, progress=False)
    assert len(calls) == 1  # the finished run was reused
    config.run.seed = 1
    with pytest.raises(ValueError, match="run.seed: 0 -> 1"):
        sweep({"run": config}, tmp_path, train=counted, progress=False)
    assert RunResult(**json.loads((workdirs["run"] / "result.json").read_text())) == result
