"""Pure-torch building blocks (no Lightning import below this package)."""

from cdl_lightning.nn.classifier import ClassifierOutput, PromptedClassifier
from cdl_lightning.nn.kd import (
    DKD,
    KDP,
    DeiTToken,
    DistillationMethod,
    FitNets,
    LogitKD,
    ModelShape,
    NoDistillation,
    ReviewKD,
)
from cdl_lightning.nn.prompts import L2P, CodaPrompt, DualPrompt, PromptPool
from cdl_lightning.nn.vit import BackboneConfig, GemmPatchEmbed, OfflineWeightsError, PromptedViT, create_vit

__all__ = [
    "BackboneConfig", "ClassifierOutput", "CodaPrompt", "DKD", "DeiTToken", "DistillationMethod", "DualPrompt",
    "FitNets", "GemmPatchEmbed", "KDP", "L2P", "LogitKD", "ModelShape", "NoDistillation", "OfflineWeightsError",
    "PromptPool", "PromptedClassifier", "PromptedViT", "ReviewKD", "create_vit",
]
