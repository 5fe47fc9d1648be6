"""Grammar-constrained decoding (structured outputs) through the engine, with the real xgrammar.

A constrained request's tokens form a document its schema accepts; a batch that mixes constrained
requests with free requests of other adapters leaves the free ones' tokens exactly what they are
without the constrained ones; a schema the engine cannot compile, or a grammar without the grammar
engine installed, is an EngineError naming the request field.
"""

from __future__ import annotations

import json
import sys

import jsonschema
import pytest

from server.engine.errors import EngineError
from server.engine.grammar import GrammarSpec
from server.engine.sampler import SamplingParams
from tests.engine.test_engine_parity import save_peft_adapter, tokens_of
from tests.engine.tiny import make_core, run_to_completion

pytest.importorskip("xgrammar")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "bc"]}, "maxItems": 3},
    },
    "required": ["name", "mood", "ok", "tags"],
    "additionalProperties": False,
}
PROMPTS = [[256, *range(65, 65 + n)] for n in (5, 9, 14, 7)]


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("grammar-adapters")
    return {
        "a": save_peft_adapter(tiny_llama, root / "a", seed=21, r=8, lora_alpha=16,
                               target_modules=["q_proj", "v_proj"]),
        "b": save_peft_adapter(tiny_llama, root / "b", seed=22, r=4, lora_alpha=8, target_modules=["o_proj"]),
    }  # fmt: skip


@pytest.fixture(scope="module")
def core(tiny_llama, adapters):
    core = make_core(tiny_llama, max_num_batched_tokens=32)
    for name, path in adapters.items():
        core.add_adapter(name, path)
    return core


def text_of(core, deltas) -> str:
    return core.tokenizer.decode(tokens_of(deltas), skip_special_tokens=True)


def constrained(spec: GrammarSpec, **sampling) -> SamplingParams:
    return SamplingParams(max_tokens=120, grammar=spec, **sampling)


FREE = [  # (request id, prompt, adapter, sampling): greedy, sampled unseeded is left out (shared noise)
    ("free-base", PROMPTS[0], None, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)),
    ("free-a", PROMPTS[1], "a", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)),
    ("free-b", PROMPTS[2], "b", SamplingParams(max_tokens=20, temperature=0.9, seed=5, ignore_eos=True)),
]


def run_free(core, extra=()) -> dict[str, list[int]]:
    for request_id, prompt, adapter, sampling in [*FREE, *extra]:
        core.add_request(request_id, prompt, sampling, adapter)
    out = run_to_completion(core)
    return {request_id: tokens_of(deltas) for request_id, deltas in out.items()} | {"_deltas": out}


def test_mixed_batch_leaves_free_requests_unchanged_and_constrained_ones_parse(core):
    """Free requests of the base, adapter a and adapter b (seeded sampling) run alone, then again
    beside constrained requests of every adapter (greedy and sampled, json_schema strict and
    json_object): the free tokens are identical, and every constrained output is schema-valid JSON."""
    alone = run_free(core)
    schema = GrammarSpec.json_schema(PERSON, strict=True)
    extra = [
        ("json-a", PROMPTS[3], "a", constrained(schema, temperature=0)),
        ("json-b", PROMPTS[0], "b", constrained(schema, temperature=1.0, seed=3)),
        ("json-base", PROMPTS[1], None, constrained(schema, temperature=0.8)),
        ("object-a", PROMPTS[2], "a", constrained(GrammarSpec("json_object"), temperature=0)),
    ]
    mixed = run_free(core, extra)
    for request_id, *_ in FREE:
        assert mixed[request_id] == alone[request_id], request_id
    deltas = mixed["_deltas"]
    for request_id in ("json-a", "json-b", "json-base"):
        assert deltas[request_id][-1].finish_reason == "stop", request_id
        jsonschema.validate(json.loads(text_of(core, deltas[request_id])), PERSON)
    assert isinstance(json.loads(text_of(core, deltas["object-a"])), dict) or (
        deltas["object-a"][-1].finish_reason == "length"
    )


def test_the_grammar_changes_what_the_model_says(core):
    """Without its grammar the same greedy request is not JSON: the mask is what made it parse."""
    core.add_request("free", PROMPTS[3], SamplingParams(max_tokens=30, temperature=0), "a")
    free_text = text_of(core, run_to_completion(core)["free"])
    with pytest.raises(json.JSONDecodeError):
        json.loads(free_text)


def test_a_finished_grammar_stops_even_with_ignore_eos(core):
    spec = GrammarSpec.json_schema({"enum": ["yes", "no"]})
    core.add_request("r", PROMPTS[0], constrained(spec, temperature=0, ignore_eos=True), None)
    deltas = run_to_completion(core)["r"]
    assert json.loads(text_of(core, deltas)) in ("yes", "no")
    assert deltas[-1].finish_reason == "stop"
    assert tokens_of(deltas)[-1] == 257  # the grammar's last token is the model's EOS


def test_preempted_constrained_request_keeps_its_grammar(tiny_llama):
    """A KV cache too small for both: one is preempted and recomputed; its grammar state survives."""
    kv_bytes = 512 * 160  # 160 tokens of K and V (2 layers x 2 KV heads x 16 dims, fp32): one at a time
    core = make_core(tiny_llama, kv_cache_bytes=kv_bytes, kv_block_size=8, max_num_batched_tokens=64)
    spec = GrammarSpec.json_schema(PERSON, strict=True)
    for i in range(3):
        core.add_request(f"r{i}", PROMPTS[i], constrained(spec, temperature=0), None)
    out = run_to_completion(core)
    assert core.scheduler.num_preemptions > 0
    for deltas in out.values():
        jsonschema.validate(json.loads(text_of(core, deltas)), PERSON)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "foo"},
        {"type": "object", "properties": {"a": {"$ref": "#/nope"}}},
        {"type": "string", "pattern": "(("},
    ],
)
def test_a_schema_that_cannot_compile_is_an_engine_error_naming_the_field(core, schema):
    with pytest.raises(EngineError) as caught:
        core.validate([256, 65], constrained(GrammarSpec.json_schema(schema, param="tools")), None)
    assert caught.value.param == "tools"
    assert "cannot be compiled" in str(caught.value)
    assert "/project/cpp" not in str(caught.value)


def test_without_the_grammar_engine_a_grammar_is_refused_with_the_install_hint(tiny_llama, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # `import xgrammar` raises ImportError
    core = make_core(tiny_llama)
    with pytest.raises(EngineError, match=r"pip install 'loraplex\[structured\]'") as caught:
        core.validate([256, 65], constrained(GrammarSpec("json_object")), None)
    assert caught.value.param == "response_format"
    core.add_request("free", [256, 65], SamplingParams(max_tokens=3, temperature=0), None)
    assert len(tokens_of(run_to_completion(core)["free"])) == 3  # everything else is served
