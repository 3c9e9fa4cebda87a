"""``cdl``: the LightningCLI of cdl-lightning (``cdl fit|validate|test|predict --config FILE``) and ``cdl compare``."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from cdl_lightning.callbacks.continual_evaluation import ContinualEvaluation
from cdl_lightning.callbacks.prediction_writer import PredictionWriter
from cdl_lightning.callbacks.rng_state import RNGStateCallback
from cdl_lightning.data import ContinualDataModule
from cdl_lightning.models import PromptLearner


def _product(num_tasks: int, epochs_per_task: int) -> int:
    return num_tasks * epochs_per_task


class CDLCLI(LightningCLI):
    """LightningCLI wired for continual learning: the data module states the task split and the epochs per task
    once; the trainer's epoch count and validation cadence and the model's task sizes, class order and class names are
    linked from it. An evaluation callback (accuracy matrix), a checkpoint callback (``last.ckpt`` every epoch), RNG
    state saving, TensorBoard and a rich progress bar are on by default."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ContinualEvaluation, "evaluation")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # last.ckpt links to the newest checkpoint instead of writing the same state twice, and is always that name
        # (no last-v1.ckpt after a resume or a re-run): distiller configs point at .../checkpoints/last.ckpt
        parser.set_defaults({"checkpoint.save_last": "link", "checkpoint.every_n_epochs": 1,
                             "checkpoint.enable_version_counter": False})
        parser.link_arguments(("data.num_tasks", "data.epochs_per_task"), "trainer.max_epochs", compute_fn=_product)
        parser.link_arguments("data.epochs_per_task", "trainer.check_val_every_n_epoch")
        parser.link_arguments("data.epochs_per_task", "model.init_args.epochs_per_task")
        for fact in ("task_sizes", "class_order", "class_names"):
            parser.link_arguments(f"data.{fact}", f"model.init_args.{fact}", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Add a rich progress bar unless the config disables progress bars or brings its own."""
        trainer_config = self._get(self.config_init, "trainer", default={})
        own_bar = any(isinstance(c, ProgressBar) for c in trainer_config.get("callbacks") or [])
        if trainer_config.get("enable_progress_bar") is not False and not own_bar:
            kwargs.setdefault("callbacks", [*(trainer_config.get("callbacks") or []), RichProgressBar()])
        return super().instantiate_trainer(**kwargs)


def cli_main(args: list[str] | None = None, run: bool = True) -> CDLCLI:
    """Build (and by default run) the CLI; ``args`` as on the command line."""
    trainer_defaults: dict[str, Any] = {
        "reload_dataloaders_every_n_epochs": 1,  # the data module serves the current task's data each epoch
        "num_sanity_val_steps": 0,
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs"}},
        "callbacks": [RNGStateCallback(), PredictionWriter()],
    }
    return CDLCLI(
        PromptLearner,
        ContinualDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},  # re-running a named run (e.g. the demo) replaces its config.yaml
        trainer_defaults=trainer_defaults,
        args=args,
        run=run,
    )


def expand_config(path: str, _seen: tuple[str, ...] = ()) -> list[str]:
    """Resolve a config's ``_base_`` list (paths relative to the file) into the ordered list of files to apply:
    bases first (recursively), then the file itself without the ``_base_`` key (written to a temporary file)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path!r} does not exist")
    key = str(file.resolve())
    if key in _seen:
        raise ValueError(f"config {path!r} includes itself through _base_")
    content = yaml.safe_load(file.read_text()) or {}
    bases = content.pop("_base_", []) if isinstance(content, dict) else []
    if not bases:
        return [path]
    files: list[str] = []
    for base in [bases] if isinstance(bases, str) else bases:
        files += expand_config(str(file.parent / base), (*_seen, key))
    if content:
        handle = tempfile.NamedTemporaryFile("w", suffix=f"-{file.name}", delete=False)
        yaml.safe_dump(content, handle)
        handle.close()
        files.append(handle.name)
    return files


def expand_config_args(args: list[str]) -> list[str]:
    """Expand every ``--config FILE`` / ``--config=FILE`` whose file has a ``_base_`` list."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config", "-c") and i + 1 < len(args):
            out += [item for f in expand_config(args[i + 1]) for item in ("--config", f)]
            i += 2
            continue
        if arg.startswith("--config="):
            out += [item for f in expand_config(arg.split("=", 1)[1]) for item in ("--config", f)]
        else:
            out.append(arg)
        i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    """The ``cdl`` console script: ``cdl fit|validate|test|predict --config FILE``, ``cdl compare RUN_DIR...`` or
    ``cdl pretrain --out FILE ...``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("compare", "pretrain", "sweep"):
        import importlib

        importlib.import_module(f"cdl_lightning.{argv[0]}").main(argv[1:])
        return
    cli_main(expand_config_args(argv))


if __name__ == "__main__":
    main()
