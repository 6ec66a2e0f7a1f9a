"""minimind-v: a tiny vision-language model you train from scratch."""

from typing import Any

# Imported on first use, so `minimind-v --help` and light modules do not pay for torch.
_LAZY = {"MiniMindVLM": "minimind_v.modeldir", "VLMConfig": "minimind_v.model.config",
         "Engine": "minimind_v.infer.engine", "SamplingParams": "minimind_v.infer.engine"}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'minimind_v' has no attribute {name!r}")
