"""``cdl``: the LightningCLI of cdl-lightning (``cdl fit|validate|test|predict --config FILE``) and the other
subcommands of `SUBCOMMANDS` (``cdl compare``, ``cdl pretrain``, ...).

Errors a user can fix (a bad path or value, an unknown config key, a teacher that does not match) are printed as one
short message naming the option and the fix, with exit status 2 and no traceback; ``--debug`` (or ``CDL_DEBUG=1``)
shows the traceback. A diverged run (`DivergenceError`) stops with exit status 1 and says where to resume from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import inspect
import json
import os
import re
import signal
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cdl_lightning.callbacks.checkpoint import RunCheckpoint
from cdl_lightning.callbacks.continual_evaluation import ContinualEvaluation
from cdl_lightning.callbacks.divergence import DivergenceCheck, DivergenceError
from cdl_lightning.callbacks.prediction_writer import PredictionWriter
from cdl_lightning.callbacks.progress import ThrottledRichProgressBar
from cdl_lightning.callbacks.rng_state import RNGStateCallback
from cdl_lightning.data import ContinualDataModule
from cdl_lightning.errors import UserError
from cdl_lightning.launch import is_started_rank, local_ranks, startup_mark
from cdl_lightning.models import PromptLearner
from cdl_lightning.nn.vit import BackboneConfig

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    # name: (module whose `main(argv)` runs it, one line of help). One line per subcommand, in the order shown.
    "compare": ("cdl_lightning.compare", "print the accuracy matrices and final metrics of runs side by side"),
    "pretrain": ("cdl_lightning.pretrain", "train a backbone offline and write its weights file"),
    "pack": ("cdl_lightning.pack", "write an image folder or arrays as the library's npz pack (class subsets too)"),
    "export": ("cdl_lightning.export", "export a trained model as torch.export (.pt2) and ONNX with a JSON sidecar"),
    "sweep": ("cdl_lightning.sweep", "run a resumable grid of runs (learners x methods x seeds) and its table"),
}
"""The ``cdl`` subcommands besides LightningCLI's ``fit``, ``validate``, ``test`` and ``predict``."""

LIGHTNING_SUBCOMMANDS = {
    "fit": "train a learner or a distiller over the whole task sequence (writes the run's config.yaml)",
    "validate": "evaluate a checkpoint on the seen tasks' test data (writes config_validate.yaml)",
    "test": "like validate, on the test loop (writes config_test.yaml)",
    "predict": "predict a folder of images with a checkpoint (writes predictions.csv, config_predict.yaml)",
}


def _product(num_tasks: int, epochs_per_task: int) -> int:
    return num_tasks * epochs_per_task


class CDLCLI(LightningCLI):
    """LightningCLI wired for continual learning: the data module states the task split and the epochs per task
    once; the trainer's epoch count and validation cadence and the model's `TaskSchedule` are linked
    from it. On by default: an evaluation callback (accuracy matrix), `RunCheckpoint` (``checkpoint.*``: a real
    ``last.ckpt`` file at every epoch end, optionally every N training steps), `DivergenceCheck` (``divergence.*``:
    stops a run whose loss or weights become non-finite), RNG state saving, TensorBoard and a rich progress bar.

    ``fit`` writes the run's ``config.yaml``; ``validate``, ``test`` and ``predict`` write ``config_<subcommand>.yaml``
    next to it and never replace it. A fresh ``fit`` into a fixed-name run folder replaces that folder's TensorBoard
    event files instead of stacking a second copy of every curve (a resumed fit, ``--ckpt_path``, keeps them)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ContinualEvaluation, "evaluation")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(DivergenceCheck, "divergence")
        parser.link_arguments(("data.num_tasks", "data.epochs_per_task"), "trainer.max_epochs", compute_fn=_product)
        parser.link_arguments("data.epochs_per_task", "trainer.check_val_every_n_epoch")
        # the task sequence (sizes, class order and names, epochs per task) is built by the data module and linked once
        parser.link_arguments("data.task_schedule", "model.init_args.task_schedule", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """validate/test/predict build a model that has ``inference_only`` (a `Distiller`) without its teacher."""
        model = self.config[self.subcommand].model if self.subcommand in ("validate", "test", "predict") else None
        if model is not None and "inference_only" in (model.get("init_args") or {}):
            model.init_args.inference_only = True

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Add a rich progress bar unless the config disables progress bars or brings its own; name the config file
        this subcommand writes (only ``fit`` writes ``config.yaml``)."""
        trainer_config = self._get(self.config_init, "trainer", default={})
        own_bar = any(isinstance(c, ProgressBar) for c in trainer_config.get("callbacks") or [])
        if trainer_config.get("enable_progress_bar") is not False and not own_bar:
            kwargs.setdefault("callbacks", [*(trainer_config.get("callbacks") or []), ThrottledRichProgressBar()])
        if self.subcommand not in (None, "fit"):
            self.save_config_kwargs["config_filename"] = f"config_{self.subcommand}.yaml"
        trainer = super().instantiate_trainer(**kwargs)
        _STATE["trainer"] = trainer
        return trainer

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """As LightningCLI's, without its warning about ``args`` (how `main` passes the expanded command line); on a
        parse error, remember the subcommand's options (for "did you mean")."""
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run")
                super().parse_arguments(parser, args)
        except Exception:
            sub = self._subcommand_parsers.get(args[0]) if isinstance(args, list) and args else None
            _STATE["parser_options"] = list(getattr(sub, "_option_string_actions", {}))
            raise

    def before_fit(self) -> None:
        """A fresh fit (no ``--ckpt_path``) into an existing run folder replaces its TensorBoard event files."""
        startup_mark("fit")
        if self._get(self.config, "ckpt_path") is not None or not self.trainer.is_global_zero:
            return
        for logger in self.trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and os.path.isdir(logger.log_dir):
                for event_file in Path(logger.log_dir).glob("events.out.tfevents.*"):
                    event_file.unlink()


def cli_main(args: list[str] | None = None, run: bool = True) -> CDLCLI:
    """Build (and by default run) the CLI; ``args`` as on the command line."""
    _STATE["trainer"] = None
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
        parser_kwargs={"exit_on_error": False},  # `main` turns parse errors into one short message
        auto_configure_optimizers=False,  # the learner builds its own optimizer (see `refuse_optimizer_options`)
        args=args,
        run=run,
    )


_STATE: dict[str, Any] = {"temp_files": {}, "trainer": None}
"""Per-process state of `main`: the temporary files of `expand_config` (temporary path -> the config it stands for)
and the trainer of the running subcommand (to tell errors before compute from errors during it)."""


def expand_config(path: str, _seen: tuple[str, ...] = ()) -> list[str]:
    """Resolve a config's ``_base_`` list (paths relative to the file) into the ordered list of files to apply:
    bases first (recursively), then the file itself without the ``_base_`` key (written to a temporary file, deleted
    when `main` returns; `cleanup_temp_configs` deletes them for other callers)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--config: config file {path!r} does not exist")
    key = str(file.resolve())
    if key in _seen:
        raise UserError(f"--config: config {path!r} includes itself through _base_")
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
        _STATE["temp_files"][handle.name] = path
        files.append(handle.name)
    return files


def cleanup_temp_configs() -> None:
    """Delete the temporary files written by `expand_config`."""
    for name in list(_STATE["temp_files"]):
        with contextlib.suppress(OSError):
            os.unlink(name)
        del _STATE["temp_files"][name]


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


_NULLS = ("null", "none", "~")


def null_backbone_fields(args: list[str]) -> list[str]:
    """Rewrite ``--KEY.backbone.FIELD null`` (or ``=null``; any key ending in ``backbone``, e.g. ``query_backbone``)
    as ``--KEY.backbone={"FIELD": null}``.

    jsonargparse (checked with 4.53.0) turns ``null`` given to one field of a dataclass nested in a subclass's
    ``init_args`` into the *string* ``'None'``: ``checkpoint_path null`` would look for a file named ``None``. The
    dict form sets the field to ``None`` and keeps the dataclass's other fields.
    """
    fields = {f.name for f in dataclasses.fields(BackboneConfig)}

    def nested(key: str) -> tuple[str, str] | None:
        parent, _, field = key.rpartition(".")
        return (parent, field) if parent.rpartition(".")[2].endswith("backbone") and field in fields else None

    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, value = arg.partition("=")
        if not eq and i + 1 < len(args):
            value = args[i + 1]
        target = nested(key[2:]) if key.startswith("--") and value.lower() in _NULLS else None
        if target is None:
            out.append(arg)
            i += 1
            continue
        out.append(f"--{target[0]}={json.dumps({target[1]: None})}")
        i += 1 if eq else 2
    return out


def usage() -> str:
    """``cdl --help``: every subcommand with one line of help."""
    names = {**LIGHTNING_SUBCOMMANDS, **{name: text for name, (_, text) in SUBCOMMANDS.items()}}
    width = max(map(len, names))
    lines = [f"  {name:<{width}}  {text}" for name, text in names.items()]
    return "\n".join([
        "usage: cdl SUBCOMMAND [options]      (cdl SUBCOMMAND --help for its options)",
        "", "subcommands:", *lines, "",
        "options: --debug (or CDL_DEBUG=1) shows the full traceback of an error",
        "example: cdl fit --config configs/demo.yaml",
    ])


def refuse_optimizer_options(args: list[str]) -> None:
    """The learners build their own optimizer (Adam and the per-task schedule): refuse LightningCLI's
    ``--optimizer`` / ``--lr_scheduler`` on the command line or as a top-level config key instead of ignoring them."""
    given = [a.split("=", 1)[0] for a in args if re.match(r"--(optimizer|lr_scheduler)\b", a)]
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args) and Path(args[i + 1]).is_file():
            content = yaml.safe_load(Path(args[i + 1]).read_text())
            if isinstance(content, dict):
                origin = _STATE["temp_files"].get(args[i + 1], args[i + 1])
                given += [f"{key} (in {origin})" for key in ("optimizer", "lr_scheduler") if key in content]
    if given:
        raise UserError(f"{', '.join(given)}: the learner builds its own optimizer (Adam, reset at each task) and "
                        "per-task LR schedule; set --model.init_args.lr, betas, weight_decay or schedule instead")


def _debug(argv: list[str]) -> tuple[bool, list[str]]:
    on = "--debug" in argv or os.environ.get("CDL_DEBUG", "") not in ("", "0")
    return on, [a for a in argv if a != "--debug"]


def _compute_started() -> bool:
    trainer = _STATE["trainer"]
    if trainer is None:
        return False
    loops = [trainer.fit_loop.epoch_loop, trainer.validate_loop, trainer.test_loop, trainer.predict_loop]
    return any(loop.batch_progress.total.ready > 0 for loop in loops)


def _root_cause(error: BaseException) -> BaseException:
    seen = {id(error)}
    while error.__cause__ is not None and id(error.__cause__) not in seen:
        error = error.__cause__
        seen.add(id(error))
    return error


def _config_origin(args: list[str], key: str) -> str | None:
    """The last ``--config`` file (as the user named it) that mentions ``key`` (a leaf key name)."""
    found = None
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            path = args[i + 1]
            with contextlib.suppress(OSError, yaml.YAMLError):
                if re.search(rf"^\s*{re.escape(key)}\s*:", Path(path).read_text(), re.MULTILINE):
                    found = _STATE["temp_files"].get(path, path)
    return found


def _accepted_keys(class_path: str) -> list[str]:
    """Constructor parameters of a class and of its bases (a subclass forwarding ``**kwargs``)."""
    module, _, name = class_path.rpartition(".")
    with contextlib.suppress(Exception):
        cls = getattr(importlib.import_module(module), name)
        keys: list[str] = []
        for klass in cls.__mro__:
            if "__init__" in vars(klass):
                keys += [p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "args", "kwargs")]
        return keys
    return []


def parse_error_message(error: BaseException, args: list[str]) -> str:
    """One or two lines for a jsonargparse parse error: the unknown key with the closest valid one and the config
    file it came from, or the first line of jsonargparse's own message."""
    text = str(error)
    match = re.search(r"unrecognized arguments: (--?[\w.]+)", text, re.IGNORECASE)
    if match:
        option = match.group(1)
        valid = _STATE.get("parser_options", [])
        close = difflib.get_close_matches(option, valid, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else "; see `cdl fit --help` for the options"
        return f"unknown option {option}{hint}"
    unknown_key = r"class_path '([\w.]+)'.*?(?:Option|Key) '([\w.]+)' is not (?:accepted|expected)"
    match = re.search(unknown_key, text, re.DOTALL)
    if match:
        class_path, key = match.groups()
        close = difflib.get_close_matches(key, _accepted_keys(class_path), n=1, cutoff=0.5)
        origin = _config_origin(args, key.split(".")[-1])
        where = f" in {origin}" if origin else ""
        hint = f"; did you mean `{close[0]}`?" if close else ""
        return f"unknown key `{key}`{where} (not an argument of {class_path}){hint}"
    match = re.search(r"Key '([\w.]+)' is not expected|Unexpected? (?:key|option)s? '?([\w.]+)", text)
    if match:
        key = match.group(1) or match.group(2)
        origin = _config_origin(args, key.split(".")[-1])
        return f"unknown key `{key}`" + (f" in {origin}" if origin else "")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("Given value")]
    return " ".join(lines[:3])[:400]


@contextlib.contextmanager
def _rich_width() -> Iterator[None]:
    """Rich tables (per-task accuracy, BWT, forgetting) at full width when the output is not a terminal (a log
    file): rich falls back to 80 columns there and cuts them."""
    if not sys.stdout.isatty() and "COLUMNS" not in os.environ:
        import rich

        rich.reconfigure(width=200)
    yield


def main(argv: list[str] | None = None) -> None:
    """The ``cdl`` console script: ``cdl fit|validate|test|predict --config FILE`` and the subcommands of
    `SUBCOMMANDS`; ``cdl --help`` lists them all. User errors exit with status 2 and one short message. A run on
    several devices of this node starts its other ranks first (`cdl_lightning.launch`)."""
    startup_mark("main")
    raw = list(sys.argv[1:] if argv is None else argv)
    debug, argv = _debug(raw)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        if not argv:
            raise SystemExit(2)
        return
    subcommand, args = argv[0], argv
    try:
        with _rich_width(), local_ranks(raw):
            try:
                if subcommand in SUBCOMMANDS:
                    importlib.import_module(SUBCOMMANDS[subcommand][0]).main(argv[1:])
                    return
                args = null_backbone_fields(expand_config_args(argv))
                refuse_optimizer_options(args)
                cli_main(args)
            except SIGTERMException:  # Lightning's stop on SIGTERM is a SystemExit with status 0: not a finished run
                print(f"cdl {subcommand}: stopped by SIGTERM (exit status 143)", file=sys.stderr, flush=True)
                raise SystemExit(128 + signal.SIGTERM) from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:  # noqa: B902 - classified below, re-raised unless it is a user's mistake
        if debug:
            raise
        code, message = _classify(error, args)
        if code is None:
            raise
        if not is_started_rank():  # rank 0 prints it; the ranks started with it hit the same error
            print(f"cdl {subcommand}: error: {message}", file=sys.stderr)
            print("  (cdl --debug ... or CDL_DEBUG=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(code) from None
    finally:
        cleanup_temp_configs()
        _STATE["trainer"] = None


def _brief(message: str, details: int = 3) -> str:
    """The first line of an error message and at most ``details`` of the lines under it (e.g. the files named)."""
    lines = [line for line in message.splitlines() if line.strip()]
    more = len(lines) - 1 - details
    return "\n".join(lines[: details + 1] + ([f"  ... and {more} more lines (--debug shows them)"] if more > 0 else []))


def _classify(error: BaseException, args: list[str]) -> tuple[int | None, str]:
    """``(exit status, message)`` of an error that is not a bug, or ``(None, "")``."""
    from jsonargparse import ArgumentError

    if isinstance(error, DivergenceError):
        return 1, str(error)
    root = _root_cause(error)
    if isinstance(error, ArgumentError) and not isinstance(root, (UserError, OSError, ValueError)):
        return 2, parse_error_message(error, args)
    if isinstance(root, UserError):
        return 2, str(root)
    before_compute = not _compute_started()
    if before_compute and isinstance(root, (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError)):
        return 2, _brief(str(root)) or type(root).__name__
    if isinstance(error, ArgumentError):
        return 2, parse_error_message(error, args)
    return None, ""


if __name__ == "__main__":
    main()
