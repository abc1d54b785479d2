"""The experiment scripts run end to end (tiny step counts; the real runs are in results/)."""

import pathlib
import subprocess
import sys

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
