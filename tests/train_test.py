import hashlib
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import base
from decjax.train import CheckpointError, ConfigError, loop, train_and_evaluate, validate
from decjax.train.records import read_jsonl

ROOT = pathlib.Path(__file__).parents[1]


def tiny_config(**overrides):
    """A model and corpus small enough that a run costs seconds, mostly compilation."""
    config = base.get_config("size=tiny")
    config.model.update(d_model=32, n_heads=2, n_layers=2, d_ff=64, n_stages=2, seq_len=32)
    config.data.update(domains=("json", "concurrent"), max_bytes_per_domain=60_000)
    config.train.update(steps=40, batch_size=4, microbatches=2, eval_every=20, eval_batches=2)
    config.log.update(every=1, progress=False, plot=False, tensorboard=False)
    config.ckpt.every = 20
    for key, value in overrides.items():
        section, field = key.split("__")
        config[section][field] = value
    return config


def _comparable(records):
    """Metrics without wall-clock fields."""
    wall = ("tokens_per_second", "wall_seconds")
    return [{k: v for k, v in r.items() if k not in wall} for r in records]


def test_resume_reproduces_uninterrupted_run(tmp_path):
    config = tiny_config()
    straight = train_and_evaluate(config, tmp_path / "straight")
    stopped = train_and_evaluate(config, tmp_path / "resumed", stop_after_step=20)
    assert stopped.steps == 20
    resumed = train_and_evaluate(config, tmp_path / "resumed")
    a = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    b = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in a if r["split"] == "train"] == list(range(1, 41))
    assert _comparable(a) == _comparable(b)
    assert resumed.final_val_loss == straight.final_val_loss
    events = [e["event"] for e in read_jsonl(tmp_path / "resumed" / "events.jsonl")]
    assert events.count("resume") == 1 and events[-1] == "end"
    # Training works: validation loss falls well below the uniform-guess level ln(258).
    assert straight.final_val_loss < straight.first_val_loss - 1.0


def test_resuming_a_finished_run_trains_nothing_and_reports_the_record(tmp_path, capsys):
    config = tiny_config(train__steps=6, train__eval_every=6, ckpt__every=6)
    first = train_and_evaluate(config, tmp_path)
    record = (tmp_path / "metrics.jsonl").read_text()
    capsys.readouterr()
    again = train_and_evaluate(config, tmp_path)
    out = capsys.readouterr().out
    assert "had already finished its 6 steps: nothing trained" in out and "nan" not in out
    assert again.tokens_per_second == first.tokens_per_second > 0
    assert again.final_val_loss == first.final_val_loss
    assert (tmp_path / "metrics.jsonl").read_text() == record


def _tree_digest(folder: pathlib.Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finished")
    train_and_evaluate(tiny_config(train__steps=2, ckpt__every=2, log__tensorboard=True,
                                   log__plot=True), workdir)
    return workdir


def _no_compute(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("compute started before the input was checked")

    monkeypatch.setattr(loop, "init_state", fail)


def test_mismatched_checkpoint_is_refused_and_kept(finished_run, tmp_path, monkeypatch):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    before = _tree_digest(workdir / "checkpoints")
    _no_compute(monkeypatch)
    with pytest.raises(CheckpointError, match=r"model.d_model: checkpoint 32, config 64"):
        train_and_evaluate(tiny_config(model__d_model=64, train__steps=4), workdir)
    assert _tree_digest(workdir / "checkpoints") == before


def test_corrupt_checkpoint_is_refused_and_kept(finished_run, tmp_path, monkeypatch):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    for path in (workdir / "checkpoints").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(b"\x00garbage" * 3)
    before = _tree_digest(workdir / "checkpoints")
    _no_compute(monkeypatch)
    with pytest.raises(CheckpointError, match="could not be read|could not be restored"):
        train_and_evaluate(tiny_config(train__steps=4), workdir)
    assert _tree_digest(workdir / "checkpoints") == before


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(model__n_layers=3), "model.n_stages"),
        (dict(model__d_model=0), "model.d_model"),
        (dict(train__batch_size=-4), "train.batch_size"),
        (dict(train__microbatches=3), "train.microbatches"),
        (dict(opt__lr=0.0), "opt.lr"),
        (dict(opt__lr=-1e-3), "opt.lr"),
        (dict(opt__schedule="linear"), "opt.schedule"),
        (dict(model__dtype="float8"), "model.dtype"),
        (dict(data__source="wikipedia"), "data.source"),
        (dict(data__tokenizer="sentencepiece"), "data.tokenizer"),
    ],
)
def test_bad_config_fails_before_compute_naming_the_field(overrides, field, tmp_path, monkeypatch):
    _no_compute(monkeypatch)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        train_and_evaluate(tiny_config(**overrides), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sequence_longer_than_data_fails_before_compute(tmp_path, monkeypatch):
    _no_compute(monkeypatch)
    config = tiny_config(model__seq_len=10_000_000)
    with pytest.raises(ValueError, match=r"model\.seq_len=10000000 is larger than the data"):
        train_and_evaluate(config, tmp_path / "run")


def test_vocab_smaller_than_tokenizer_is_refused(tmp_path, monkeypatch):
    _no_compute(monkeypatch)
    with pytest.raises(ConfigError, match="model.vocab_size=100"):
        train_and_evaluate(tiny_config(model__vocab_size=100), tmp_path / "run")


def test_run_record_files(finished_run):
    config = json.loads((finished_run / "config.json").read_text())
    assert config["model"]["d_model"] == 32
    metrics = read_jsonl(finished_run / "metrics.jsonl")
    train = [r for r in metrics if r["split"] == "train"]
    assert len(train) == 2 and len(train[0]["grad_norm_body"]) == 2
    assert all(np.isfinite(r["loss"]) for r in metrics)
    events = [e["event"] for e in read_jsonl(finished_run / "events.jsonl")]
    assert events[0] == "start" and "checkpoint" in events and events[-1] == "end"
    work = [e for e in read_jsonl(finished_run / "events.jsonl") if e["event"] == "work"]
    microbatches = config["train"]["microbatches"]
    assert [e["step"] for e in work] == list(range(1, config["train"]["steps"] + 1))
    assert all(e["microbatches"] == {"io": microbatches, "stage0": microbatches,
                                     "stage1": microbatches} for e in work)
    assert (finished_run / "loss.png").stat().st_size > 1000
    assert list((finished_run / "tb").glob("events.out.tfevents.*"))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "decjax.train", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_cli_reports_bad_override_without_traceback(tmp_path):
    result = _cli("--config=configs/base.py:size=tiny", f"--workdir={tmp_path}",
                  "--config.model.n_stages=3")
    assert result.returncode != 0
    assert "error: model.n_stages=3 is not allowed" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_rejects_misspelt_field(tmp_path):
    result = _cli("--config=configs/base.py:size=tiny", f"--workdir={tmp_path}",
                  "--config.model.dmodel=3")
    assert result.returncode != 0 and "dmodel" in result.stderr


def test_config_variant_typo_is_rejected():
    with pytest.raises(ValueError, match="expected key=value with key in"):
        base.get_config("sise=tiny")


def test_simulated_clock_and_failure_events(tmp_path):
    config = tiny_config(train__steps=6, ckpt__every=6, sim__failures="mtbf",
                         sim__mtbf_seconds=1.0, sim__failure_seed=3, method__name="redundant")
    train_and_evaluate(config, tmp_path)
    train = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    start = read_jsonl(tmp_path / "events.jsonl")[0]
    per_step = start["sim_iteration_seconds"]
    assert per_step > 0
    np.testing.assert_allclose([r["sim_seconds"] for r in train],
                               per_step * np.arange(1, 7), rtol=1e-12)
    assert all(r["wall_seconds"] > 0 for r in train)
    failures = [(e["step"], e["stage"]) for e in read_jsonl(tmp_path / "events.jsonl")
                if e["event"] == "failure"]
    trace = (tmp_path / "failure_trace.csv").read_text().splitlines()[1:]
    expected = [(int(s) + 1, int(t)) for s, t, _ in (line.split(",") for line in trace)]
    assert failures == expected and len(failures) > 3  # MTBF 1 s, iterations of seconds


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(sim__network="mars"), "sim.network"),
        (dict(sim__uniform_bandwidth_gibps=-1.0, sim__network="uniform"),
         "sim.uniform_bandwidth_gibps"),
        (dict(sim__failure_rate=1.0), "sim.failure_rate"),
        (dict(sim__failure_rate=-0.1), "sim.failure_rate"),
        (dict(sim__schedule="zigzag"), "sim.schedule"),
        (dict(sim__failures="csv", sim__failure_csv="/nonexistent.csv"), "sim.failure_csv"),
    ],
)
def test_bad_sim_config_fails_naming_the_field(overrides, field, tmp_path, monkeypatch):
    _no_compute(monkeypatch)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        train_and_evaluate(tiny_config(**overrides), tmp_path / "run")


def test_trace_naming_a_missing_stage_is_refused(tmp_path, monkeypatch):
    _no_compute(monkeypatch)
    csv = tmp_path / "trace.csv"
    csv.write_text("step,target,kind\n3,7,fail\n")
    config = tiny_config(sim__failures="csv", sim__failure_csv=str(csv), method__name="redundant")
    with pytest.raises(ValueError, match="stage 7 but there are only 2 stages"):
        train_and_evaluate(config, tmp_path / "run")


def test_sim_cli_prints_iteration_breakdown():
    result = subprocess.run(
        [sys.executable, "-m", "decjax.sim", "--config=configs/base.py:size=500m",
         "--config.sim.replicas=3", "--config.sim.failures=hourly",
         "--config.method.name=checkfree_plus"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for needle in ("simulated iteration time:", "compute", "communication", "allreduce",
                   "average node idle", "Australia", "per iteration"):
        assert needle in out, needle
    result = subprocess.run(
        [sys.executable, "-m", "decjax.sim", "--config=configs/base.py:size=tiny",
         "--config.sim.network=atlantis"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "sim.network='atlantis'" in result.stderr


@pytest.mark.parametrize("module, override, message", [
    ("decjax.train", "--config.train.stpes=5",
     "--config.train.stpes: the config has no field 'stpes'; did you mean \"steps\""),
    ("decjax.train", "--config.trian.steps=5", "the config has no field 'trian'"),
    ("decjax.sim", "--config.sim.netwrk=x", "the config has no field 'netwrk'"),
])
def test_a_misspelt_config_field_fails_in_one_line(tmp_path, module, override, message):
    result = subprocess.run(
        [sys.executable, "-m", module, "--config=configs/quickstart.py", override,
         *([f"--workdir={tmp_path / 'run'}"] if module == "decjax.train" else [])],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_sim_cli_refuses_what_the_trainer_refuses(tmp_path):
    csv = tmp_path / "trace.csv"
    csv.write_text("step,target,kind\n3,7,fail\n")
    for flags, message in [
        (["--config.method.storage_region=Mars"],
         "error: method.storage_region='Mars' is not allowed: unknown region 'Mars'"),
        (["--config.sim.failures=csv", f"--config.sim.failure_csv={csv}",
          "--config.method.name=checkfree_plus"],
         "trace refers to stage 7 but there are only 2 stages"),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "decjax.sim", "--config=configs/base.py:size=tiny", *flags],
            cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def _failure_events(workdir):
    return [(e["step"], e["stage"]) for e in read_jsonl(workdir / "events.jsonl")
            if e["event"] == "failure"]


def test_checkfree_plus_survives_a_hundred_failures(tmp_path):
    config = tiny_config(train__steps=70, ckpt__every=70, train__eval_every=70,
                         sim__failures="mtbf", sim__mtbf_seconds=10.0,
                         method__name="checkfree_plus")
    config.model.update(n_layers=6, n_stages=6)
    train_and_evaluate(config, tmp_path)
    assert len(_failure_events(tmp_path)) >= 100
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert all(np.isfinite(r["loss"]) for r in metrics)
    recoveries = [e for e in read_jsonl(tmp_path / "events.jsonl") if e["event"] == "recovery"]
    assert {"copy", "interpolate"} <= {e["kind"] for e in recoveries}


def test_methods_share_the_trace_and_charge_their_costs(tmp_path):
    runs = {}
    for name in ("checkfree", "checkfree_plus", "checkpoint", "redundant"):
        config = tiny_config(train__steps=12, ckpt__every=12, sim__failures="mtbf",
                             sim__mtbf_seconds=20.0, method__name=name,
                             method__checkpoint_every=4)
        config.model.update(n_layers=4, n_stages=4)
        train_and_evaluate(config, tmp_path / name)
        runs[name] = _failure_events(tmp_path / name)
    assert runs["checkfree_plus"] == runs["checkpoint"] == runs["redundant"]
    assert len(runs["checkfree_plus"]) > 0
    # Plain CheckFree sees the same trace restricted to the interior stages 1 and 2.
    assert runs["checkfree"] == [(s, t) for s, t in runs["checkfree_plus"] if t in (1, 2)]
    # Checkpointing rolls back: model progress falls behind the iteration count.
    train = [r for r in read_jsonl(tmp_path / "checkpoint" / "metrics.jsonl")
             if r["split"] == "train"]
    assert train[-1]["model_step"] < train[-1]["step"]
    plain = [r for r in read_jsonl(tmp_path / "checkfree_plus" / "metrics.jsonl")
             if r["split"] == "train"]
    assert plain[-1]["model_step"] == 12
    # Redundant computation pays every iteration: its clock runs faster per step.
    start = {name: read_jsonl(tmp_path / name / "events.jsonl")[0]["sim_iteration_seconds"]
             for name in runs}
    assert start["redundant"] > start["checkfree_plus"] == start["checkpoint"]


def test_plain_checkfree_with_two_stages_is_refused(tmp_path, monkeypatch):
    _no_compute(monkeypatch)
    config = tiny_config(sim__failures="hourly", method__name="checkfree")  # 2 stages
    with pytest.raises(ConfigError, match="model.n_stages=2 there is no interior stage"):
        train_and_evaluate(config, tmp_path)
    config.method.name = "checkfree_plus"
    validate(config)


def _work(workdir, stage: int) -> list[int]:
    """Microbatches ``stage`` ran at each step."""
    return [e["microbatches"][f"stage{stage}"] for e in read_jsonl(workdir / "events.jsonl")
            if e["event"] == "work"]


def test_routing_around_a_lost_stage_shares_checkfrees_trace(tmp_path):
    runs = {}
    for name in ("checkfree", "checkfree_reroute", "reroute"):
        config = tiny_config(train__steps=12, ckpt__every=12, train__eval_every=6,
                             sim__failures="mtbf", sim__mtbf_seconds=20.0, method__name=name)
        config.model.update(n_layers=4, n_stages=4)
        train_and_evaluate(config, tmp_path / name)
        runs[name] = _failure_events(tmp_path / name)
    assert runs["checkfree"] == runs["checkfree_reroute"] == runs["reroute"]
    (first_step, stage), *_ = runs["reroute"]
    # Never rebuilt: the stage runs no microbatch from its failure on.
    work = _work(tmp_path / "reroute", stage)
    assert set(work[first_step - 1:]) == {0} and set(work[:first_step - 1]) == {2}
    # Rebuilt: skipped only while the fetch lasts (one iteration here), then back.
    events = read_jsonl(tmp_path / "checkfree_reroute" / "events.jsonl")
    skipped = sum(e["iterations"] for e in events if e["event"] == "reroute")
    assert skipped >= 1 and _work(tmp_path / "checkfree_reroute", stage).count(0) <= skipped
    # The stall is what rerouting saves: CheckFree's clock is charged the fetch.
    clocks = {n: read_jsonl(tmp_path / n / "metrics.jsonl")[-1]["sim_seconds"] for n in runs}
    assert clocks["checkfree"] > clocks["checkfree_reroute"] == clocks["reroute"]


def test_a_stage_copied_from_a_peer_replica_trains_exactly_as_without_failures(tmp_path):
    losses, clocks = {}, {}
    for name, failures in (("none", "none"), ("peer_copy", "mtbf")):
        config = tiny_config(train__steps=8, ckpt__every=8, train__eval_every=4,
                             sim__failures=failures, sim__mtbf_seconds=20.0, sim__replicas=2,
                             method__name=name)
        train_and_evaluate(config, tmp_path / name)
        rows = read_jsonl(tmp_path / name / "metrics.jsonl")
        losses[name] = [r["loss"] for r in rows]
        clocks[name] = rows[-1]["sim_seconds"]
    assert len(_failure_events(tmp_path / "peer_copy")) > 0
    assert losses["peer_copy"] == losses["none"]  # the copy is exact
    assert clocks["peer_copy"] > clocks["none"]  # but it costs the transfers
    config = tiny_config(sim__failures="mtbf", method__name="peer_copy")  # one replica
    with pytest.raises(ConfigError, match="sim.replicas=1 there is no peer replica"):
        validate(config)


def test_a_resumed_reroute_run_still_skips_its_lost_stages(tmp_path):
    config = tiny_config(train__steps=12, ckpt__every=6, train__eval_every=6,
                         sim__failures="mtbf", sim__mtbf_seconds=20.0, method__name="reroute")
    config.model.update(n_layers=4, n_stages=4)
    straight = train_and_evaluate(config, tmp_path / "straight")
    train_and_evaluate(config, tmp_path / "resumed", stop_after_step=6)
    resumed = train_and_evaluate(config, tmp_path / "resumed")
    assert resumed.final_val_loss == straight.final_val_loss
    (step, stage), *_ = _failure_events(tmp_path / "straight")
    assert step <= 6 and _work(tmp_path / "resumed", stage)[-1] == 0


def test_skippipe_config_trains_along_planned_partial_pipelines(tmp_path):
    from configs import skippipe

    config = skippipe.get_config("size=tiny,steps=6")
    config.log.update(progress=False, plot=False)
    train_and_evaluate(config, tmp_path)
    events = read_jsonl(tmp_path / "events.jsonl")
    start = events[0]
    assert start["method"] == "skippipe" and start["schedules"] == 5
    assert start["sim_iteration_seconds"] == pytest.approx(np.mean(start["makespans"]))
    # 25 % skip of 5 stages: every stage runs 12 of the 15 microbatches, every step.
    work = [e["microbatches"] for e in events if e["event"] == "work"]
    assert len(work) == 6 and all(w[f"stage{s}"] == 12 for w in work for s in range(5))
    last = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert last["sim_seconds"] == pytest.approx(6 * start["sim_iteration_seconds"])
    config.sim.failures = "hourly"
    with pytest.raises(ConfigError, match="skippipe needs sim.failures='none'"):
        validate(config)


def test_no_failure_method_refuses_a_failure_trace(tmp_path, monkeypatch):
    _no_compute(monkeypatch)
    with pytest.raises(ConfigError, match="method.name='none'"):
        train_and_evaluate(tiny_config(sim__failures="hourly"), tmp_path)
