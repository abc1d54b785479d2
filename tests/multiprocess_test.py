"""Real processes on 127.0.0.1: replicated training survives kill -9, lets a replacement in, and
equals the one-process run. Every process is ended by PID; every run has a hard deadline."""

import dataclasses
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from decjax.dist import LaunchError, launch, read_pids

pytestmark = pytest.mark.multiprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEADLINE_S = 240
# A loaded 2-core machine runs several of these at once: be generous before declaring death.
DIST = ["--config.dist.heartbeat_seconds=10", "--config.dist.collective_timeout_seconds=10"]


def train_command(workdir: pathlib.Path, config: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "decjax.train", f"--config={ROOT / 'configs' / config}",
            f"--workdir={workdir}", "--config.run.progress=False", *DIST, *overrides]


def start_launcher(tmp_path: pathlib.Path, processes: int, command: list[str],
                   *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "decjax.launch", f"--processes={processes}",
         f"--logs={tmp_path / 'logs'}", f"--timeout_s={DEADLINE_S - 20}", *flags, "--", *command],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def end_all(launcher: subprocess.Popen, logs: pathlib.Path) -> None:
    """SIGKILLs the launcher and every process it started, by PID."""
    for pid in [launcher.pid, *read_pids(logs)["all_pids"]]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launcher.wait()


def last_step(workdir: pathlib.Path) -> int:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return 0
    return max((json.loads(line)["step"] for line in path.read_text().splitlines()
                if line.strip()), default=0)


def events(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "events.jsonl").read_text().splitlines()]


def run_and_kill(tmp_path, *, respawn: int = 0, steps: int, processes: int = 4,
                 config: str = "noloco.py:size=tiny", kill_at: int = 10):
    """``processes`` processes of ``config``; process 2 is SIGKILLed at step ``kill_at``."""
    workdir = tmp_path / "run"
    command = train_command(workdir, config, f"--config.run.steps={steps}")
    launcher = start_launcher(tmp_path, processes, command, f"--respawn={respawn}")
    try:
        deadline = time.monotonic() + DEADLINE_S
        while last_step(workdir) < kill_at:
            assert launcher.poll() is None, launcher.stdout.read()
            assert time.monotonic() < deadline, f"the run did not reach step {kill_at}"
            time.sleep(0.1)
        os.kill(read_pids(tmp_path / "logs")["pids"]["2"], signal.SIGKILL)
        output, _ = launcher.communicate(timeout=deadline - time.monotonic())
        return launcher.returncode, output, workdir
    finally:
        end_all(launcher, tmp_path / "logs")


def run_to_end(tmp_path, processes: int, config: str) -> dict:
    """The result of ``processes`` processes of ``config``, which must exit 0."""
    workdir = tmp_path / "run"
    launcher = start_launcher(tmp_path, processes, train_command(workdir, config))
    try:
        output, _ = launcher.communicate(timeout=DEADLINE_S)
    finally:
        end_all(launcher, tmp_path / "logs")
    assert launcher.returncode == 0, output
    return json.loads((workdir / "result.json").read_text())


def test_four_processes_survive_a_sigkill(tmp_path):
    rc, output, workdir = run_and_kill(tmp_path, respawn=0, steps=40)
    assert rc == 0, output
    assert "process 2" in output and "SIGKILL" in output
    log = events(workdir)
    failure = next(e for e in log if e["event"] == "failure")
    assert failure["processes"] == [2] and failure["replica_ids"] == [2]
    regroup = next(e for e in log if e["event"] == "regroup")
    assert regroup["replica_ids"] == [0, 1, 3]
    assert regroup["next_groups"] == [[0, 1, 2]]  # three replicas: one group of three
    result = json.loads((workdir / "result.json").read_text())
    assert len(result["train_loss"]) == 40 and np.isfinite(result["train_loss"]).all()
    assert result["final_replica_ids"] == [0, 1, 3] and len(result["final_replica_losses"]) == 3
    assert result["val_loss_mean"][-1] < result["val_loss_mean"][0]


def test_a_replacement_joins_and_copies_a_live_peer(tmp_path):
    rc, output, workdir = run_and_kill(tmp_path, respawn=1, steps=90)
    assert rc == 0, output
    log = events(workdir)
    names = [e["event"] for e in log]
    assert names.index("failure") < names.index("regroup") < names.index("join")
    join = next(e for e in log if e["event"] == "join")
    assert join["replica_ids"] == [2] and join["replicas"] == 4 and join["epoch"] == 1
    assert join["copy_bytes"] > 0
    result = json.loads((workdir / "result.json").read_text())
    assert result["final_replica_ids"] == [0, 1, 2, 3]
    assert len(result["train_loss"]) == 90 and np.isfinite(result["train_loss"]).all()
    # The joiner copied a peer, so it evaluates like one, not like a fresh model.
    fresh = result["val_loss_mean"][0]
    assert max(result["final_replica_losses"]) < fresh - 0.5


@pytest.mark.parametrize("config", ["diloco.py", "noloco.py"])
def test_two_processes_equal_the_one_process_vmap_run(tmp_path, config):
    from configs import diloco, noloco
    from decjax.train.distributed import run_config
    from decjax.train.replicated import train

    variant = "size=tiny,replicas=2"
    distributed = run_to_end(tmp_path, 2, f"{config}:{variant}")
    module = {"diloco.py": diloco, "noloco.py": noloco}[config]
    alone = train(dataclasses.replace(run_config(module.get_config(variant)), progress=False))
    np.testing.assert_allclose(distributed["train_loss"], alone.train_loss, atol=1e-6)
    np.testing.assert_allclose(distributed["final_replica_losses"], alone.final_replica_losses,
                               atol=1e-6)
    np.testing.assert_allclose(distributed["val_loss_averaged"], alone.val_loss_averaged,
                               atol=1e-6)


HDEE = "hdee.py:size=tiny"


def test_three_processes_of_experts_equal_the_one_process_run(tmp_path):
    from configs import hdee
    from decjax.train.experts import run_config, train

    distributed = run_to_end(tmp_path, 3, HDEE)
    assert distributed["processes"] == 3
    config = hdee.get_config("size=tiny")
    config.run.progress = False
    alone = train(run_config(config), config.dist, tmp_path / "alone")  # 3 of 8 fake devices
    np.testing.assert_allclose(distributed["val_loss_curve"], alone["val_loss_curve"], atol=1e-6)
    for name, expert in alone["experts"].items():
        for domain, loss in expert["val_loss"].items():
            np.testing.assert_allclose(distributed["experts"][name]["val_loss"][domain], loss,
                                       atol=1e-6)


def test_experts_survive_a_sigkill_and_account_the_lost_budget(tmp_path):
    rc, output, workdir = run_and_kill(tmp_path, processes=3, config=HDEE, kill_at=15,
                                       steps="(60,90,120)")  # M_He-I_Ho: 90 steps each
    assert rc == 0, output
    log = events(workdir)
    failure = next(e for e in log if e["event"] == "failure")
    assert failure["processes"] == [2] and failure["experts"] == ["markov2_v16"]
    assert failure["budget_steps"] == [90] and 15 <= failure["steps_done"][0] < 90
    regroup = next(e for e in log if e["event"] == "regroup")
    assert regroup["experts"] == ["markov3_v4_a0.2", "markov2_v8"] and regroup["devices"] == 2
    result = json.loads((workdir / "result.json").read_text())
    lost = result["experts"]["markov2_v16"]
    assert lost["status"] == f"lost at step {failure['step']}"
    assert lost["steps_done"] == failure["steps_done"][0]
    assert all(result["experts"][n]["status"] == "finished"
               for n in ("markov3_v4_a0.2", "markov2_v8"))
    budget = result["budget"]
    assert budget["lost_spent_flops"] == failure["spent_flops"] > 0
    assert budget["never_spent_flops"] == failure["lost_flops"] > 0
    assert (budget["finished_flops"] + budget["lost_spent_flops"] + budget["never_spent_flops"]
            == budget["planned_flops"])
    # The lost expert's domain is scored by the best survivor.
    assert result["domain_val_loss"]["markov2_v16"]["expert"] != "markov2_v16"
    assert np.isfinite(result["val_loss_curve"]).all()


def test_bad_launcher_input_is_refused_before_anything_starts(tmp_path):
    command = train_command(tmp_path / "run", "noloco.py:size=tiny")
    with pytest.raises(LaunchError, match="processes=0 is not allowed: an integer >= 1"):
        launch(command, processes=0, log_dir=tmp_path / "logs")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(LaunchError, match=f"port={port} on 127.0.0.1 is in use"):
            launch(command, processes=2, port=port, log_dir=tmp_path / "logs")
    assert not (tmp_path / "logs" / "processes.json").exists()  # nothing was started


def test_a_process_that_never_arrives_fails_fast_and_keeps_the_old_result(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n')
    command = train_command(workdir, "noloco.py:size=tiny,replicas=2",
                            "--config.dist.init_timeout_seconds=5")
    launcher = start_launcher(tmp_path, 2, command, "--ranks=0")  # process 1 is never started
    began = time.monotonic()
    try:
        output, _ = launcher.communicate(timeout=DEADLINE_S)
    finally:
        end_all(launcher, tmp_path / "logs")
    assert launcher.returncode == 1
    assert "processes [1] never arrived" in output
    assert time.monotonic() - began < 60
    assert (workdir / "metrics.jsonl").read_text().count("\n") == 1  # untouched


def test_processes_with_different_configs_are_stopped_with_the_fields(tmp_path):
    port = _free_port()
    workdir = tmp_path / "run"
    first = start_launcher(tmp_path / "a", 2, train_command(workdir, "noloco.py:size=tiny,"
                                                            "replicas=2"),
                           "--ranks=0", f"--port={port}")
    second = start_launcher(tmp_path / "b", 2, train_command(
        workdir, "noloco.py:size=tiny,replicas=2", "--config.run.lr=0.01"),
        "--ranks=1", f"--port={port}")
    try:
        out_first, _ = first.communicate(timeout=DEADLINE_S)
        out_second, _ = second.communicate(timeout=DEADLINE_S)
    finally:
        end_all(first, tmp_path / "a" / "logs")
        end_all(second, tmp_path / "b" / "logs")
    assert first.returncode != 0 and second.returncode != 0
    logs = out_first + out_second
    assert "different configs (run.lr: 0.003 here, 0.01 in process 1" in logs
    assert not (workdir / "result.json").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
