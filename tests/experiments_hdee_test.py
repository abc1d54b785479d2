"""The HDEE experiment runs end to end on its quick grid, and a rerun retrains nothing."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]
ENSEMBLES = ("M_Ho-I_Ho", "M_He-I_Ho", "M_Ho-I_He")


def test_hdee_quick_grid_writes_table_and_plots_and_resumes(tmp_path):
    command = [sys.executable, "experiments/hdee/run.py", "--grid=quick", f"--out={tmp_path}"]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "done seed-s0" in first.stdout and "done dense-s0" in first.stdout

    table = (tmp_path / "quick.md").read_text()
    for domain, group in (("encodings", "easy"), ("asyncio", "moderate"),
                          ("distutils", "hard"), ("xml", "held-out"),
                          ("markov1_v8", "held-out")):
        assert f"| {domain} | {group} |" in table
    assert "Heterogeneous ensemble lowest on" in table
    for label in ("uniform-prior posterior", "BTM cached prior (val)", "top-1 by cached prior",
                  "log-prob average (not a mixture)"):
        assert f"| {label} |" in table
    # check_budget's table: every ensemble and the dense model at exactly the same budget.
    assert table.count("+0.000%") == 4
    for plot in ("quick_perplexity.png", "quick_val_curves.png"):
        assert (tmp_path / plot).stat().st_size > 1000

    records = json.loads((tmp_path / "quick_runs.json").read_text())
    assert set(records["runs"]) == {f"{k}|seed0" for k in (*ENSEMBLES, "dense", "seed")}
    one = records["runs"]["M_He-I_Ho|seed0"]
    assert one["padded_d_ff"] == 256  # S, M and L trained in one padded, vmapped group
    evaluation = one["test"]["markov1_v8"]
    assert evaluation["prior_rows"] > 0 and abs(sum(evaluation["prior"]) - 1) < 1e-5
    assert set(evaluation["modes"]) == {"uniform_posterior", "cached_prior", "top1",
                                        "logprob_average_not_mixture"}

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "done " not in again.stdout  # every finished run was reused, none retrained
    assert (tmp_path / "quick.md").read_text() == table
