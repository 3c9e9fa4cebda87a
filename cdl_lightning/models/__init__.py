"""LightningModules that wire the pure-torch pieces of `cdl_lightning.nn` together."""

from cdl_lightning.models.distiller import Distiller, TeacherRun
from cdl_lightning.models.learner import PromptLearner, quarter_cosine

__all__ = ["Distiller", "PromptLearner", "TeacherRun", "quarter_cosine"]
