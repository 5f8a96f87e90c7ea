"""When a sample stops after a new token: stop token, EOS, max_tokens or max_model_len (stop strings live in
the RequestGroup, which sees the text)."""

from __future__ import annotations

from common.engine.request import Request, RequestStatus


def token_stop_status(sample: Request, token: int, max_model_len: int) -> RequestStatus | None:
    """The finish status ``token`` (already appended to ``sample``) causes, or None to go on.

    Stop tokens and EOS count only once ``min_tokens`` are out; a stop token becomes the sample's stop_reason.
    A structured-output sample stops once its grammar has terminated (it allows nothing more).
    """
    params = sample.sampling_params
    if sample.num_output_tokens >= params.min_tokens:
        if token in params.stop_token_ids:
            sample.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if not params.ignore_eos and token in sample.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
    grammar = sample.grammar
    if grammar is not None and (grammar.is_terminated or sample.grammar_rejected):
        return RequestStatus.FINISHED_STOPPED
    if params.max_tokens is not None and sample.num_output_tokens >= params.max_tokens:
        return RequestStatus.FINISHED_LENGTH
    if sample.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None
