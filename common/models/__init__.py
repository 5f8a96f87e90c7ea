"""Llama-family model code (Llama 2/3, Mistral, SmolLM2, Qwen2/3) and weight loading.

The engine uses: ``resolve_model_path`` -> ``resolve_dtype`` -> ``load_model`` (or ``build_model``).
"""

from common.models.loader import load_model, resolve_dtype, resolve_model_path
from common.models.registry import ARCHITECTURES, build_model
from kernels.attention_metadata import AttentionMetadata

__all__ = [
    "ARCHITECTURES",
    "AttentionMetadata",
    "build_model",
    "load_model",
    "resolve_dtype",
    "resolve_model_path",
]
