"""Lightning callbacks for continual learning; usable in any Lightning project (no dependency on our models/data)."""

from cdl_lightning.callbacks.checkpoint import RunCheckpoint
from cdl_lightning.callbacks.continual_evaluation import ContinualEvaluation, OutputAdapter
from cdl_lightning.callbacks.divergence import DivergenceCheck, DivergenceError
from cdl_lightning.callbacks.progress import ThrottledRichProgressBar
from cdl_lightning.callbacks.rng_state import RNGStateCallback
from cdl_lightning.callbacks.sigterm import SigtermCheck

__all__ = [
    "ContinualEvaluation",
    "DivergenceCheck",
    "DivergenceError",
    "OutputAdapter",
    "RNGStateCallback",
    "RunCheckpoint",
    "SigtermCheck",
    "ThrottledRichProgressBar",
]
