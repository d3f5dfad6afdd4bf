"""Low-Rank Clone (LRC) distillation: clone a small LM from a Llama/Qwen2 teacher.

Public API:
    LRCConfig, LowRankClone, CloneOutput    -- the method (lrc_src.clone)
"""

__all__ = ["LRCConfig", "LowRankClone", "CloneOutput"]


def __getattr__(name):  # lazy, so `import lrc_src.packing` does not pay for torch/transformers twice
    if name in __all__:
        from lrc_src import clone

        return getattr(clone, name)
    raise AttributeError(f"module 'lrc_src' has no attribute {name!r}")
