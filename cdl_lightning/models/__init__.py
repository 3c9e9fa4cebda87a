"""LightningModules that wire the pure-torch pieces of `cdl_lightning.nn` together."""

from cdl_lightning.models.distiller import Distiller, TeacherRun
from cdl_lightning.models.learner import PromptLearner, quarter_cosine
from cdl_lightning.models.snapshots import checkpoint_snapshots

__all__ = ["Distiller", "PromptLearner", "TeacherRun", "checkpoint_snapshots", "quarter_cosine"]
