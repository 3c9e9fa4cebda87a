"""Lightning callbacks for continual learning; usable in any Lightning project (no dependency on our models/data)."""

from cdl_lightning.callbacks.continual_evaluation import ContinualEvaluation, OutputAdapter
from cdl_lightning.callbacks.rng_state import RNGStateCallback

__all__ = ["ContinualEvaluation", "OutputAdapter", "RNGStateCallback"]
