"""The README's Python example runs as written (with the Trainer shortened to two batches per epoch)."""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch


def test_readme_python_example_runs(tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## From Python and in notebooks\n\n```python\n(.*?)```", readme, re.S).group(1)

    class ShortTrainer(lightning.pytorch.Trainer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs, limit_train_batches=2, logger=False, enable_progress_bar=False,
                             default_root_dir=str(tmp_path))

    monkeypatch.setattr(lightning.pytorch, "Trainer", ShortTrainer)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["evaluation"].summary()["final"]["task"] == 4
    assert (tmp_path / "metrics.json").is_file()
