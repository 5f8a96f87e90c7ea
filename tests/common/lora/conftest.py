"""PEFT-created LoRA adapters for a tiny random Llama (see ``tests.common.lora.support``)."""

from __future__ import annotations

import pytest


@pytest.fixture
def make_peft_adapter(tmp_path):
    """``(folder, peft_model) = make_peft_adapter(name, **lora_config)``: saved with lora_B randomized."""
    from tests.common.lora.support import save_peft_adapter

    return lambda name, **lora_config: save_peft_adapter(tmp_path / name, **lora_config)
