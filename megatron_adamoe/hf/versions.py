"""Differences between the transformers releases the HF side supports (4.46 to 5.x)."""

from __future__ import annotations


def dtype_kwarg() -> str:
    """``from_pretrained``'s name for the weights' dtype: ``dtype`` since transformers 4.56,
    ``torch_dtype`` before (now a deprecated alias)."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
