"""Prompt learners: each maps a batch of queries to per-layer key/value prefixes and an auxiliary loss."""

from cdl_lightning.nn.prompts.base import PromptOutput, PromptPool, build_prompt_pool
from cdl_lightning.nn.prompts.coda import CodaPrompt, gram_schmidt_
from cdl_lightning.nn.prompts.dualprompt import DualPrompt
from cdl_lightning.nn.prompts.l2p import L2P

__all__ = ["build_prompt_pool", "CodaPrompt", "DualPrompt", "L2P", "PromptOutput", "PromptPool", "gram_schmidt_"]
