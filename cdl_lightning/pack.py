"""``cdl pack``: the command of `cdl_lightning.data.pack`, beside ``compare``/``pretrain`` for the CLI dispatch."""

from cdl_lightning.data.pack import main

__all__ = ["main"]
