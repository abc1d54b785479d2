"""The README's Python examples run top to bottom, as a reader would paste them."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)  # the training example writes runs/tiny here
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["logits"].shape == (2, 8, 128, 258)
    assert namespace["rows"].shape == (32, 257)  # the data example rebinds rows
    assert np.isfinite(namespace["summary"].final_val_loss)
    assert namespace["routes"].shape == (4, 4) and len(namespace["repairs"]) == 1
    assert namespace["loco_state"].count.tolist() == [1, 1, 1, 1]
    assert 0 < namespace["iteration"].seconds < 230  # faster than full pipelines (230 s)
    assert namespace["pipe"].seconds > 0 and namespace["trace"].n_targets == 6
    assert (tmp_path / "runs" / "tiny" / "metrics.jsonl").exists()
    assert set(namespace["modes"]) >= {"uniform_posterior", "cached_prior"}
    assert namespace["payment"].status == ["committed"] and namespace["payment"].check() == []
