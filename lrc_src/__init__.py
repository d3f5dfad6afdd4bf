"""Low-Rank Clone (LRC) distillation: clone a small LM from a Llama/Qwen2 teacher.

Public API:
    LRCConfig, LowRankClone    -- the method (lrc_src.clone)
"""
from lrc_src.clone import LRCConfig, LowRankClone, CloneOutput

__all__ = ["LRCConfig", "LowRankClone", "CloneOutput"]
