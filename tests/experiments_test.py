"""The experiment scripts run end to end (tiny step counts; the real runs are in results/)."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]


def test_checkfree_quick_grid_writes_table_and_plot(tmp_path):
    result = subprocess.run(
        [sys.executable, "experiments/checkfree/run.py", "--grid=quick", "--steps=10",
         f"--out={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "quick.md").read_text()
    for label in ("no failures", "checkpointing", "CheckFree+"):
        assert f"| 33% | {label} |" in table
    assert (tmp_path / "val_loss_rate33.png").stat().st_size > 1000
    assert "plots:" in result.stdout


def test_noloco_quick_grid_writes_table_and_plots_and_resumes(tmp_path):
    command = [sys.executable, "experiments/noloco/run.py", "--grid=quick", "--steps=10",
               f"--out={tmp_path}"]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    table = (tmp_path / "quick.md").read_text()
    for label in ("data parallel", "DiLoCo, heavy-ball 0.3", "DiLoCo, Nesterov 0.9",
                  "NoLoCo, pairs"):
        assert f"| 4 | {label} |" in table
    assert "NoLoCo vs DiLoCo" in table
    for plot in ("quick_val_loss_R4.png", "quick_communication.png"):
        assert (tmp_path / plot).stat().st_size > 1000
    assert len(list((tmp_path / "runs").glob("*/result.json"))) == 4
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "done " not in again.stdout  # every finished run was reused, none retrained
    assert (tmp_path / "quick.md").read_text() == table
    # A finished run of another config stops the grid with one line; nothing is overwritten.
    stored = sorted((tmp_path / "runs").glob("noloco-*/config.json"))[0]
    changed = json.loads(stored.read_text())
    changed["run"]["seed"] = 7
    stored.write_text(json.dumps(changed))
    result = stored.with_name("result.json").read_bytes()
    refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    assert "holds a finished run of another config (run.seed: 7 -> 0)" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert stored.with_name("result.json").read_bytes() == result


def test_skippipe_quick_grid_writes_tables_and_plot(tmp_path):
    result = subprocess.run(
        [sys.executable, "experiments/skippipe/run.py", "--grid=quick", f"--out={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "quick_results.md").read_text()
    for label in ("full pipelines", "round robin (unaware)",
                  "SkipPipe without collision awareness", "SkipPipe (collision aware)"):
        assert f"| 20 nodes (reference) | 25 % | {label} |" in table
    for label in ("0 % (full pipelines)", "25 % skip", "33 % skip",
                  "25 % skip, no swaps"):
        assert f"| {label} |" in table
    assert "keep 50%" in table and "Omitted stages" in table
    assert (tmp_path / "quick_val_loss.png").stat().st_size > 1000
    runs = tmp_path / "runs"  # config runs of configs/skippipe.py, one per variant
    assert len(list(runs.glob("*/events.jsonl"))) == len(list(runs.glob("*/omitted.json"))) == 6
    # A rerun reuses the stored rotations and the finished runs: no training.
    again = subprocess.run(
        [sys.executable, "experiments/skippipe/run.py", "--grid=quick", f"--out={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    def training(text):  # part 2 (part 1 re-measures the planner's wall time)
        return text[text.index("### 2."):text.index("### 3.")]

    assert "done " not in again.stdout
    assert training((tmp_path / "quick_results.md").read_text()) == training(table)


def combinations_rows(part: str, row_prefix: str, out: pathlib.Path) -> dict:
    """``{method label: cells}`` of one combinations table, run on its quick grid."""
    result = subprocess.run(
        [sys.executable, "experiments/combinations/run.py", f"--part={part}", "--grid=quick",
         f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return {line.split(" | ")[1]: line.split(" | ") for line in
            (out / f"{part}-quick.md").read_text().splitlines() if line.startswith(row_prefix)}


def test_combinations_quick_grid_writes_its_table(tmp_path):
    rows = combinations_rows("peer_copy", "| 33%", tmp_path)
    assert set(rows) == {"no failures", "checkpointing", "CheckFree+", "copy from a peer replica"}
    # An exact copy from a peer replica loses nothing: the final loss is the no-failure one.
    assert rows["copy from a peer replica"][6] == rows["no failures"][6]
    assert float(rows["CheckFree+"][2]) > 0  # the trace has failures


def test_combinations_noloco_quick_grid_writes_its_table(tmp_path):
    rows = combinations_rows("noloco", "| 0.2 ", tmp_path)
    assert set(rows) == {"no failures", "CheckFree inside the replica",
                         "CheckFree, equal weights", "copy from a peer replica"}
    lost = float(rows["copy from a peer replica"][2])
    assert lost == float(rows["CheckFree inside the replica"][2]) > 0  # one shared trace
    # a drifted peer's stage is nearer the lost one than the neighbours' average
    assert float(rows["copy from a peer replica"][3]) < float(
        rows["CheckFree inside the replica"][3])


@pytest.mark.parametrize("script, flag, message", [
    ("checkfree", "--steps=-5", "flag --steps=-5: -5 is not a non-negative integer"),
    ("noloco", "--steps=-5", "flag --steps=-5: -5 is not a non-negative integer"),
    ("skippipe", "--steps=-5", "flag --steps=-5: -5 is not a non-negative integer"),
    ("skippipe", "--variants=skip25,bogus", "unknown ['bogus']; allowed: skip0, skip25"),
    ("skippipe", "--seeds=0,x", "flag --seeds=['0', 'x']: integers >= 0, comma-separated"),
    ("hdee", "--grid=huge", "flag --grid=huge: value should be one of <full|quick>"),
])
def test_bad_experiment_flags_fail_in_one_line_before_any_work(tmp_path, script, flag,
                                                               message):
    result = subprocess.run(
        [sys.executable, f"experiments/{script}/run.py", flag, f"--out={tmp_path}"], cwd=ROOT,
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not any(tmp_path.iterdir())
