"""Public engine API: ``from common.engine import LLM, SamplingParams``."""

from common.engine.llm import LLM
from common.engine.outputs import CompletionOutput, Logprob, RequestOutput
from common.engine.sampling_params import SamplingParams
from common.lora.request import LoRARequest

__all__ = ["LLM", "CompletionOutput", "Logprob", "LoRARequest", "RequestOutput", "SamplingParams"]
