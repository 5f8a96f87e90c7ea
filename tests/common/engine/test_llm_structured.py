"""Structured outputs through the real engine (SmolLM2 on CPU): valid outputs under every kind of constraint,
greedy and seeded, n > 1, a too small max_tokens, preemption, a resumed request, and unconstrained requests in
the same batch left exactly as they were."""

from __future__ import annotations

import gc
import json

import jsonschema
import pytest
import torch

from common.engine import LLM, SamplingParams
from common.engine.sampling_params import StructuredOutputs

PHONE = StructuredOutputs(regex=r"[0-9]{3}-[0-9]{4}")
COLORS = {
    "type": "object",
    "properties": {
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 2, "maxItems": 3}
    },
    "required": ["colors"],
}
ASK = "Reply in JSON with the colors Ana likes: blue and green."


@pytest.fixture(scope="module")
def smol() -> LLM:
    return LLM("smollm2", dtype="float32", device="cpu", kv_cache_memory=128 * 2**20)


def chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def constrained(spec: StructuredOutputs, **fields) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 96, "structured_outputs": spec, **fields})


def json_params(schema: dict, **fields) -> SamplingParams:
    return constrained(StructuredOutputs(json=json.dumps(schema)), **fields)


def run_to_end(llm: LLM, request_id: str):
    while True:
        for output in llm.engine.step():
            if output.request_id == request_id and output.finished:
                return output


def test_every_kind_of_constraint_and_n_samples_in_one_batch(smol):
    """Constrained requests of each kind batched with a plain one, whose tokens and logprobs stay as alone."""
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    requests = {
        "plain": ("What is the capital of France?", plain),
        "json": (ASK, json_params(COLORS)),
        "json_sampled": (ASK, json_params(COLORS, temperature=0.9, seed=7)),
        "json_object": (
            'Reply with a JSON object like {"answer": "Paris"}: what is the capital of France?',
            constrained(StructuredOutputs(json_object=True)),
        ),
        "regex": ("Give a phone number.", constrained(PHONE)),
        "choice": ("What is the capital of France?", constrained(StructuredOutputs(choice=("Paris", "Rome")))),
        "grammar": ("Is the sky blue?", constrained(StructuredOutputs(grammar='root ::= "It is " ("yes" | "no")'))),
        "n2": ("Pick a city.", constrained(StructuredOutputs(choice=("Oslo", "Lima")), n=2, temperature=1.0, seed=3)),
    }
    outputs = dict(
        zip(
            requests, smol.chat([chat(q) for q, _ in requests.values()], [p for _, p in requests.values()]), strict=True
        )
    )
    text = {name: output.outputs[0].text for name, output in outputs.items()}
    for name in ("json", "json_sampled"):
        jsonschema.validate(json.loads(text[name]), COLORS)
        assert outputs[name].outputs[0].token_ids[-1] == 2  # ended by EOS, all a complete value allows
    assert isinstance(json.loads(text["json_object"]), dict)
    assert text["regex"][:3].isdigit() and text["regex"][3] == "-" and text["regex"][4:].isdigit()
    assert text["choice"] in ("Paris", "Rome") and text["grammar"] in ("It is yes", "It is no")
    assert all(c.text in ("Oslo", "Lima") and c.finish_reason == "stop" for c in outputs["n2"].outputs)
    assert [c.index for c in outputs["n2"].outputs] == [0, 1]
    alone = smol.chat(chat(requests["plain"][0]), plain)[0].outputs[0]
    assert outputs["plain"].outputs[0].token_ids == alone.token_ids
    for batched, single in zip(outputs["plain"].outputs[0].logprobs, alone.logprobs, strict=True):
        assert {t: e.logprob for t, e in batched.items()} == pytest.approx(
            {t: e.logprob for t, e in single.items()}, abs=1e-4
        )


def test_too_small_max_tokens_is_length_with_a_valid_prefix(smol):
    spec = StructuredOutputs(json=json.dumps(COLORS))
    output = smol.chat(chat(ASK), constrained(spec, max_tokens=5))[0].outputs[0]
    assert output.finish_reason == "length" and len(output.token_ids) == 5
    smol.engine.grammars.new_state(spec, output.token_ids)  # every token follows the schema (else ValueError)


def test_logprobs_come_from_the_raw_logits(smol):
    plain = smol.chat(chat(ASK), SamplingParams(temperature=0.0, max_tokens=1, logprobs=3))[0].outputs[0]
    spec = StructuredOutputs(choice=("Zebra",))
    forced = smol.chat(chat(ASK), constrained(spec, max_tokens=1, logprobs=3))[0].outputs[0]
    assert forced.token_ids != plain.token_ids
    raw_top = {t: e.logprob for t, e in plain.logprobs[0].items() if e.rank <= 3}
    assert {t: e.logprob for t, e in forced.logprobs[0].items() if e.rank <= 3} == pytest.approx(raw_top, abs=1e-4)


def test_stop_strings_cut_a_constrained_output(smol):
    spec = StructuredOutputs(choice=("hello brave world",))
    output = smol.chat(chat("Say hello"), constrained(spec, stop=[" world"]))[0].outputs[0]
    assert (output.text, output.finish_reason, output.stop_reason) == ("hello brave", "stop", " world")


def test_a_resumed_request_continues_the_same_grammar(smol):
    """Decode pool and migration: the tokens generated elsewhere come with the request; the matcher replays them."""
    params = constrained(PHONE)
    full = smol.generate("My phone number is ", params)[0]
    prompt_ids, tokens = full.prompt_token_ids, full.outputs[0].token_ids
    request_id = smol.engine.add_request(
        prompt_token_ids=prompt_ids, output_token_ids=tokens[:3], sampling_params=params
    )
    assert run_to_end(smol, request_id).outputs[0].token_ids == tokens
    # a prefill worker taking over a migrated request (services/prefill first_token_request): one more token
    prefill = params.replace(max_tokens=4)
    request_id = smol.engine.add_request(
        prompt_token_ids=prompt_ids, output_token_ids=tokens[:3], sampling_params=prefill, export_kv=True
    )
    exported = run_to_end(smol, request_id)
    assert exported.outputs[0].token_ids == tokens[:4] and exported.exported_kv is not None
    broken = tokens[:2] + smol.get_tokenizer().encode("x")
    with pytest.raises(
        ValueError, match="output_token_ids: token .* at position 2 does not follow the structured_outputs regex"
    ):
        smol.engine.add_request(prompt_token_ids=prompt_ids, output_token_ids=broken, sampling_params=params)
    assert not smol.engine.has_unfinished_requests()


def test_bad_constraints_fail_at_admission_and_queue_nothing(smol):
    good = constrained(StructuredOutputs(choice=("a",)))
    bad = constrained(StructuredOutputs(regex="[a-"))
    with pytest.raises(ValueError, match="structured_outputs.regex: "):
        smol.generate(["one", "two"], [good, bad])
    assert not smol.engine.has_unfinished_requests()


def test_outputs_survive_preemption(smol):
    """Preemption recomputes the KV from the tokens; the grammar state (kept with the outputs) stays right."""
    tight = LLM("smollm2", dtype="float32", device="cpu", num_gpu_blocks_override=6, max_model_len=96)
    prompts = [f"{name} keeps a notebook of contacts. " * 5 + f"The phone number of {name} is " for name in "ABC"]
    params = constrained(PHONE, max_tokens=16)
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, params)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert got == [o.outputs[0].token_ids for o in smol.generate(prompts, params)]


@pytest.mark.gpu
def test_cuda_graphs_and_eager_give_the_same_valid_output():
    """Decode steps replay CUDA graphs; the mask is applied to the logits outside the captured forward."""
    questions = [ASK, "Reply in JSON with the colors Bo likes: red and blue."]
    params = [json_params(COLORS), constrained(PHONE)]
    outputs = {}
    for eager in (False, True):
        llm = LLM("smollm2", dtype="float32", device="cuda", gpu_memory_utilization=0.3, enforce_eager=eager)
        assert (llm.engine.runner.decode_graphs is None) == eager
        outputs[eager] = [o.outputs[0] for o in llm.chat([chat(q) for q in questions], params)]
        del llm
        gc.collect()  # its KV cache is sized from the free memory: give the first engine's back
        torch.cuda.empty_cache()
    jsonschema.validate(json.loads(outputs[False][0].text), COLORS)
    assert [o.token_ids for o in outputs[False]] == [o.token_ids for o in outputs[True]]
