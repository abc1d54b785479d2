"""Domain corpus and streams; vmapped expert training against separate runs, masks, sharding."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from decjax import tree
from decjax.data import LMData
from decjax.ensemble import domains as dm
from decjax.ensemble import experts as ex
from decjax.ensemble import train as tr
from decjax.models import LlamaConfig, StagedLlama
from decjax.testing import log_compilations

CFG = LlamaConfig(vocab_size=32, d_model=16, n_heads=2, n_layers=1, d_ff=32)
MODEL = StagedLlama(CFG, 1)
SEQ = 8


def _domain_rows(n, stride, seed):
    """``[n, SEQ+1]`` progressions over ids 1..31 with a domain-specific stride."""
    start = np.random.default_rng(seed).integers(0, 31, (n, 1))
    return ((start + stride * np.arange(SEQ + 1)) % 31 + 1).astype(np.int32)


def _corpus(counts=((40, 8), (30, 8), (5, 8), (0, 2))):
    names = ("law", "wiki", "math", "empty")
    parts = {"train": [], "val": []}
    for i, (n_train, n_val) in enumerate(counts):
        parts["train"].append((_domain_rows(n_train, i + 1, i), np.full(n_train, i)))
        parts["val"].append((_domain_rows(n_val, i + 1, 100 + i), np.full(n_val, i)))
    cat = lambda split, k: np.concatenate([p[k] for p in parts[split]])
    return dm.corpus_from_rows(names, cat("train", 0), cat("train", 1), cat("val", 0),
                               cat("val", 1))


# -- domains ---------------------------------------------------------------------------------


def test_val_and_test_are_disjoint_halves_of_validation():
    val = np.arange(30, dtype=np.int32).reshape(10, 3)
    data = LMData(tokenizer=None, domains=("a", "b"), train=val.copy(),
                  train_domain_ids=np.array([0, 1] * 5, np.int32), val=val,
                  val_domain_ids=np.array([0] * 7 + [1] * 3, np.int32), entropy_rate=None,
                  description="")
    corpus = dm.domain_corpus(data)
    for d, n_val in (("a", 7), ("b", 3)):
        v, t = corpus.get("val", d), corpus.get("test", d)
        assert len(v) + len(t) == n_val and len(v) == n_val // 2
        assert not set(map(tuple, v)) & set(map(tuple, t))
    assert len(corpus.get("train", "a")) == 5
    assert "a " in corpus.summary()
    with pytest.raises(ValueError, match="split='dev' is not one of"):
        corpus.get("dev", "a")


@pytest.mark.parametrize("experts, held_out, message", [
    ({"e": ("law", "nope")}, (), r"experts\['e'\]: unknown domain 'nope'; available: law, wiki, "
                                 "math, empty"),
    ({"e": ("law",)}, ("physics",), "held_out: unknown domain 'physics'; available: law"),
    ({"e": ("law", "wiki")}, ("wiki",), r"domain 'wiki' is both in experts\['e'\]=\('law', "
                                        r"'wiki'\) and in held_out=\('wiki',\)"),
    ({"e": ("empty",)}, (), r"expert e has no training data \(domains empty\)"),
    ({"e": "law"}, (), r"experts\['e'\]='law' must be a tuple of domain names"),
    ({}, (), "must be a non-empty mapping"),
])
def test_assign_domains_rejects_bad_assignments(experts, held_out, message):
    with pytest.raises(ValueError, match=message):
        dm.assign_domains(_corpus(), experts, held_out)


def test_held_out_needs_test_rows_and_good_assignment_passes():
    corpus = _corpus(((40, 8), (30, 8), (5, 8), (0, 0)))
    with pytest.raises(ValueError, match="held_out domain 'empty' has no test rows"):
        dm.assign_domains(corpus, {"e": ("law",)}, ("empty",))
    got = dm.assign_domains(corpus, {"a": ["law"], "b": ("wiki", "law")}, ("math",))
    assert got.experts == {"a": ("law",), "b": ("wiki", "law")}
    assert got.training_domains == ("law", "wiki") and got.held_out == ("math",)


def test_streams_are_seeded_cycle_small_domains_and_restore():
    corpus = _corpus()
    make = lambda seed: dm.expert_streams(corpus, {"m": ("math",), "w": ("wiki", "law")},
                                          batch_size=4, seed=seed)
    a, b, c = make(0), make(0), make(1)
    batches = [a["m"].next() for _ in range(5)]  # 20 rows from a 5-row domain: 4 epochs
    assert a["m"].epochs == 4.0
    for i in range(4):  # every epoch is a permutation of the domain's rows
        epoch = np.concatenate(batches)[5 * i: 5 * i + 5]
        assert sorted(map(tuple, epoch)) == sorted(map(tuple, corpus.get("train", "math")))
    np.testing.assert_array_equal(batches[0], b["m"].next())
    assert not np.array_equal(a["w"].next(), c["w"].next())
    saved = a["w"].get_state()
    expected = a["w"].next()
    a["w"].set_state(saved)
    np.testing.assert_array_equal(a["w"].next(), expected)


# -- vmapped training --------------------------------------------------------------------------


def _state(total_steps, d_ff, lr_scale=None, tx=None):
    """Experts of widths ``d_ff`` padded to ``CFG.d_ff`` (the mask is part of the state)."""
    tx = tr.adam_direction(weight_decay=0.01) if tx is None else tx
    params = tr.init(MODEL.init, jax.random.key(0), len(d_ff))
    params = jax.vmap(ex.apply_d_ff_mask)(params, jnp.asarray(d_ff))
    return tx, tr.init_expert_state(params, tx, total_steps=total_steps, d_ff=d_ff,
                                    lr_scale=lr_scale)


def _batches(n_steps, n_experts, batch=4):
    return [jnp.asarray(np.stack([_domain_rows(batch, e + 1, 10 * t + e)
                                  for e in range(n_experts)])) for t in range(n_steps)]


def test_vmapped_group_equals_separate_experts_and_masks_freeze_finished_ones():
    schedule = tr.cosine_lr(1e-2, warmup_steps=1, final_ratio=0.0)
    total = [3, 5, 4]
    tx, state = _state(total, d_ff=[24, 32, 28], lr_scale=[1.0, 0.5, 2.0])
    single = jax.jit(tr.expert_step_fn(MODEL, tx, schedule))
    separate = [tree.index(state, e) for e in range(3)]
    step = tr.make_expert_train_step(MODEL, tx, schedule, donate=False)
    snapshots, losses, sep_losses = [], [], []
    for t, rows in enumerate(_batches(5, 3)):
        active = jnp.asarray([t < n for n in total])
        with log_compilations() as compiled:
            state, metrics = step(state, rows, active)
        assert t == 0 or not compiled, compiled  # a new active mask reuses the program
        snapshots.append(state)
        losses.append(metrics["loss"])
        for e in range(3):
            separate[e], m = single(separate[e], rows[e], active[e])
            sep_losses.append(m["loss"])
    np.testing.assert_allclose(np.array(losses).T.ravel(),
                               np.array(sep_losses).reshape(5, 3).T.ravel(), rtol=1e-5)
    chex.assert_trees_all_close(state.params, tree.stack([s.params for s in separate]),
                                rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(state.step, total)
    w_up = np.asarray(state.params["body"]["mlp"]["w_up"]["kernel"])
    assert not w_up[0, ..., 24:].any() and not w_up[2, ..., 28:].any() and w_up[1, ..., 28:].any()
    # Expert 0 finished after step 3: its params and optimizer state are bit-identical since.
    chex.assert_trees_all_equal(tree.index(snapshots[2], 0), tree.index(state, 0))
    assert not np.array_equal(snapshots[2].params["io"]["head"]["kernel"][1],
                              state.params["io"]["head"]["kernel"][1])
    # Per-expert schedules: each one decays to 0 at its own budget, scaled by lr_scale.
    lr = np.array(metrics["lr"])
    assert lr[1] == pytest.approx(0.5 * 1e-2 * 0.5 * (1 + np.cos(np.pi * 3 / 4)), rel=1e-6)
    # An inactive expert is unchanged even before its budget is spent.
    paused, _ = step(snapshots[0], _batches(1, 3)[0], jnp.asarray([False, True, True]))
    chex.assert_trees_all_equal(tree.index(paused, 0), tree.index(snapshots[0], 0))


def test_master_weights_are_float32_with_bfloat16_compute():
    group = ex.ExpertGroup(dataclasses.replace(CFG, dtype="bfloat16"),
                           (ex.ExpertSpec("a", ("law",), 32, 3, CFG),))
    tx = tr.adam_direction()
    state = jax.eval_shape(lambda: tr.init_expert_state(
        tr.group_params(group, key=jax.random.key(0)), tx, total_steps=[3]))
    dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))}
    assert dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}, dtypes


def test_schedules_end_at_each_experts_budget():
    step, total = jnp.arange(10), jnp.full((10,), 10)
    cos = np.array(tr.cosine_lr(1.0, warmup_steps=2, final_ratio=0.1)(step, total))
    np.testing.assert_allclose(cos[:3], [0.5, 1.0, 1.0])
    assert np.all(np.diff(cos[2:]) < 0) and cos[-1] > 0.1
    wsd = np.array(tr.wsd_lr(1.0, decay_fraction=0.2)(step, total))
    np.testing.assert_allclose(wsd, [1] * 8 + [0.5, 0.0])
    with pytest.raises(ValueError, match="final_ratio=2 must lie in"):
        tr.cosine_lr(1.0, final_ratio=2)


def test_sharded_over_expert_mesh_equals_unsharded():
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices")
    mesh = tr.expert_mesh(4, jax.devices()[:4])
    assert mesh.shape == {"expert": 4}
    schedule = tr.constant_lr(0.1)
    # Plain SGD: Adam's first steps map last-bit differences of gradients near eps (the two
    # programs batch matmuls differently) to visible ones, which says nothing about sharding.
    tx, state = _state([2, 3, 3, 1], d_ff=[32, 24, 32, 16], tx=optax.identity())
    plain = tr.make_expert_train_step(MODEL, tx, schedule, donate=False)
    sharded = tr.make_expert_train_step(MODEL, tx, schedule, mesh=mesh)
    sharded_state = tr.shard_experts(state, mesh)
    for rows in _batches(3, 4):
        active = jnp.ones((4,), bool)
        state, m_plain = plain(state, rows, active)
        sharded_state, m_shard = sharded(sharded_state, tr.shard_experts(rows, mesh),
                                         tr.shard_experts(active, mesh))
        np.testing.assert_allclose(m_shard["loss"], m_plain["loss"], rtol=1e-5)
    assert sharded_state.params["io"]["head"]["kernel"].sharding.spec[0] == "expert"
    chex.assert_trees_all_close(sharded_state.params, state.params, rtol=1e-5, atol=1e-6)
    assert tr.expert_mesh(3, jax.devices()[:4]).shape == {"expert": 3}
    assert tr.expert_mesh(5, jax.devices()[:4]) is None


def test_independent_init_does_not_depend_on_the_group():
    law, wiki = (ex.ExpertSpec(n, (n,), f, 3, CFG) for n, f in (("law", 24), ("wiki", 32)))
    alone, padded = ex.group_by_shape([wiki])[0], ex.group_by_shape([law, wiki], max_pad_ratio=2)[0]
    inits = [tr.unstack_experts(g, tr.group_params(g, key=jax.random.key(3))) for g in (alone,
                                                                                      padded)]
    chex.assert_trees_all_equal(inits[0]["wiki"], inits[1]["wiki"])
    assert ex.params_d_ff(inits[1]["law"]) == 24
    with pytest.raises(ValueError, match=r"seeds: no seed model of d_ff \[24\]; available: \[32"):
        tr.group_params(padded, seeds=inits[0]["wiki"])


def test_train_experts_branches_from_a_seed_and_records_history():
    corpus = _corpus()
    seed_params, seed_hist = tr.train_seed_model(
        CFG, corpus, ("law", "wiki", "math"), steps=4, lr_schedule=tr.cosine_lr(1e-2),
        batch_size=4, progress=False)
    assert len(seed_hist.train_loss("seed")) == 4
    ensemble = ex.step_heterogeneous(CFG, [("law", "easy"), ("wiki", "moderate"),
                                           ("math", "hard")], d_ff=32, steps=(2, 3, 4))
    params_E, history = tr.train_experts(
        ensemble, corpus, lr_schedule=tr.cosine_lr(1e-2), batch_size=4, seeds=seed_params,
        eval_every=2, eval_domains=("law", "math"), progress=False)
    assert [len(history.train_loss(n)) for n in history.names] == [2, 3, 4]
    assert history.val_loss("law", "law")[:, 0].tolist() == [0, 2, 2, 2]  # steps 0, 2, 3, 4
    assert history.train[-1]["epochs"] == pytest.approx(16 / 5)  # math: 16 rows of 5
    # Every expert starts from the seed, so all score the seed's loss at step 0.
    start = [history.val_loss(n, "math")[0, 1] for n in history.names]
    np.testing.assert_allclose(start, start[0], rtol=1e-6)
    experts = tr.unstack_experts(ex.group_by_shape(ensemble)[0], params_E)
    assert list(experts) == ["law", "wiki", "math"]
