"""`RunCheckpoint`: ``last.ckpt`` at every epoch end (and optionally every N training steps), exact to resume from."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from typing_extensions import override

__all__ = ["RunCheckpoint"]


class RunCheckpoint(ModelCheckpoint):
    """A `ModelCheckpoint` for runs that must lose little when they crash and resume exactly.

    - ``last.ckpt`` is written at the end of every ``every_n_epochs``-th training epoch (after that epoch's
      validation, so a task-end checkpoint holds its accuracy-matrix row), whatever the validation cadence is:
      Lightning's own callback saves only after validation when validation is not every epoch, and a continual run
      validates once per task.
    - ``every_n_train_steps`` adds a checkpoint every N optimizer steps (for long epochs); it may be combined with
      ``every_n_epochs`` (Lightning makes the two exclusive). No step checkpoint is written on an epoch's last batch:
      resuming from one would skip that epoch's validation; the epoch-end checkpoint follows a moment later.
    - ``last.ckpt`` is a real file (not a link), written atomically (Lightning writes to a temporary file and moves
      it), so copying or moving a run folder keeps it valid. With the default ``save_top_k=0`` it is the only file.
    - Never saves on an exception whose ``keeps_last_checkpoint`` attribute is true (a diverged run: its state is not
      worth keeping and must not replace the last good one).
    - ``background=True`` writes the files in a background thread (Lightning's `AsyncCheckpointIO`): the tensors are
      copied when the checkpoint is taken, so the file holds that moment's state, and training goes on while it is
      serialised and written. The run waits for the last write before ``fit`` returns, also when it raises (the
      strategy's teardown); a failed write fails the run at the next checkpoint or at the end. Only ``fit`` writes in
      the background: the strategy's checkpoint IO is restored when it ends, so a ``trainer.save_checkpoint`` after
      it writes in place. The cost: a process killed (``kill -9``, out of memory) while a write is in flight, i.e.
      within about half a second of a checkpoint, loses that checkpoint; the previous ``last.ckpt`` stays intact (the
      write is atomic). Written in place (the default), a checkpoint is on disk before training goes on.

    Args:
        dirpath: folder of the checkpoints (default: the logger's ``log_dir/checkpoints``).
        filename: name pattern of the top-k checkpoints (see `ModelCheckpoint`).
        every_n_epochs: save at the end of every N-th training epoch (``0`` = never at epoch ends).
        every_n_train_steps: also save every N optimizer steps (``None``/``0`` = off).
        save_last: keep ``last.ckpt`` (``True``; ``"link"`` makes it a symbolic link to the newest top-k file).
        save_top_k: extra numbered checkpoints to keep besides ``last.ckpt`` (default ``0``: none).
        enable_version_counter: ``False`` keeps the name ``last.ckpt`` after a resume or a re-run (distiller configs
            point at ``.../checkpoints/last.ckpt``).
        background: write in a background thread (see above). Not with ``save_top_k`` != 0 (Lightning deletes older
            numbered files from the main thread, possibly while one is being written). A ViT-B CODA teacher's
            ``last.ckpt`` grows with its tasks, by the rows each task changed (`cdl_lightning.models.snapshots`):
            76.9 MB after the tenth while Adam's two moments were stored whole (the trainable state, the moments, the
            first snapshot whole and nine row deltas), written in 0.22 s per epoch on an H200 machine (0.32 s when
            every snapshot was stored whole; `benchmarks/measured/2026-12-01_h200_packed_snapshots`). Adam's moments
            are now stored as their nonzero rows (`cdl_lightning.models.optimizer_state`): on a CPU a tenth-task
            checkpoint of the same shapes (random weights) shrank from 75.0 to 46.8 MB, Adam's part from 31.3 to 3.1
            MB (``benchmarks/checkpoint_size.py --task 9``). On one H200 a 10-task run's 10 checkpoints held
            training up for 3.67 s in place and 1.46 s in the background (plus about 1.25 s waiting for the last
            write at the end: its ``other`` phase grew from 0.43 s to 1.68 s), its training as fast
            (`benchmarks/measured/2026-12-01_h200_streams/call5`).
        **kwargs: further `ModelCheckpoint` arguments (``monitor``, ``mode``, ``save_on_exception``, ...).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str | None = None,
        every_n_epochs: int = 1,
        every_n_train_steps: int | None = None,
        save_last: bool | Literal["link"] | None = True,
        save_top_k: int = 0,
        enable_version_counter: bool = False,
        background: bool = False,
        **kwargs: Any,
    ) -> None:
        if every_n_epochs < 0:
            raise ValueError(f"checkpoint.every_n_epochs must be >= 0, got {every_n_epochs}")
        if kwargs.pop("save_on_train_epoch_end", None) is False:
            raise ValueError("checkpoint.save_on_train_epoch_end=false is not supported: RunCheckpoint saves at the "
                             "end of each training epoch, after its validation; set checkpoint.every_n_epochs "
                             "(0 = never) or checkpoint.every_n_train_steps instead")
        steps = every_n_train_steps or 0
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            save_last=save_last,
            save_top_k=save_top_k,
            every_n_train_steps=steps,
            every_n_epochs=0 if steps else every_n_epochs,  # Lightning refuses both; the epoch saves are ours
            save_on_train_epoch_end=True,
            enable_version_counter=enable_version_counter,
            **kwargs,
        )
        self.epoch_interval = every_n_epochs
        if background and save_top_k != 0:
            raise ValueError(f"checkpoint.background=true with save_top_k={save_top_k} is not supported: Lightning "
                             "deletes older numbered checkpoints while a background write may be in flight; set "
                             "save_top_k 0 (only last.ckpt) or background false")
        self.background = background
        self._async_io: AsyncCheckpointIO | None = None  # the wrapper this callback installed for the current fit

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not (self.background and stage == "fit"):
            return
        io = trainer.strategy.checkpoint_io
        if self._async_io is not None and io is self._async_io:
            io = io.checkpoint_io  # ours, left by a fit that raised: a fresh one (not raising that fit's error again)
        if not isinstance(io, AsyncCheckpointIO):
            # the strategy tears its checkpoint IO down at the end of the run, also on an exception: it then waits
            self._async_io = trainer.strategy.checkpoint_io = AsyncCheckpointIO(io)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if stage == "fit" and self._async_io is not None and trainer.strategy.checkpoint_io is self._async_io:
            # the strategy's teardown has waited for the writes: a `trainer.save_checkpoint` after `fit` (or during
            # `validate`/`test`) writes in place again, complete when it returns
            trainer.strategy.checkpoint_io = self._async_io.checkpoint_io
            self._async_io = None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # an epoch's last batch: the epoch-end checkpoint covers it (a step checkpoint here is inexact)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_skip_saving_checkpoint(trainer):
            return
        if self.epoch_interval >= 1 and (trainer.current_epoch + 1) % self.epoch_interval == 0:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if getattr(exception, "keeps_last_checkpoint", False):
            return
        super().on_exception(trainer, pl_module, exception)
