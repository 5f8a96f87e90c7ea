"""Public engine API: ``from common.engine import LLM, SamplingParams``."""

from common.engine.llm import LLM
from common.engine.outputs import CompletionOutput, Logprob, RequestOutput
from common.engine.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams"]
