"""cdl-lightning: Continual Distillation Learning on PyTorch Lightning."""

__version__ = "0.1.0"
