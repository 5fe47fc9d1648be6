"""Per-request composition over HTTP (issue 18) against the real peft ``add_weighted_adapter``.

The app runs in process (Starlette's TestClient) on a real Engine over a tiny Llama with a real
SQLite store and API keys; the adapters are saved by peft and uploaded over HTTP. Every answer is
checked against peft's composed adapter: greedy tokens equal, logprobs within float tolerance.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from adapters.store import SQLiteAdapterStore
from adapters.tenants import KeyRing, add_key
from server.api.app import create_app
from server.config import EngineConfig, ModelConfig
from server.engine.engine import Engine

BASE = "tiny"
PROMPT = [256, 72, 101, 108, 108, 111]
MAX_TOKENS = 8
FILES = ("adapter_config.json", "adapter_model.safetensors")
ADAPTERS = {  # name → LoraConfig fields
    "a4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b4": dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]),
    "c8": dict(r=8, lora_alpha=4, use_rslora=True,
               target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
}  # fmt: skip


class Api:
    def __init__(self, client: TestClient, keys: dict[str, str], dirs: dict[str, Path], base_dir: Path, app):
        self.client, self.keys, self.dirs, self.base_dir, self.app = client, keys, dirs, base_dir, app

    def post(self, who: str, path: str, body: dict | str):
        headers = {"Authorization": f"Bearer {self.keys[who]}"}
        if isinstance(body, str):
            headers["Content-Type"] = "application/json"
            return self.client.post(path, content=body, headers=headers)
        return self.client.post(path, json=body, headers=headers)

    def upload(self, who: str, name: str, adapter: str):
        files = [("files", (f, (self.dirs[adapter] / f).read_bytes())) for f in FILES]
        headers = {"Authorization": f"Bearer {self.keys[who]}"}
        response = self.client.post("/v1/adapters", data={"name": name}, files=files, headers=headers)
        assert response.status_code == 201, response.text
        return response.json()

    def complete(self, who: str, **fields):
        body = {"model": BASE, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True, "logprobs": 1, **fields}  # fmt: skip
        return self.post(who, "/v1/completions", body)

    @property
    def compositions(self):
        return self.app.state.loraplex.compositions


def save_adapter(base_dir: Path, out: Path, seed: int, fields: dict) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(init_lora_weights=False, **fields)
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_llama_dir) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("composition")
    dirs = {name: save_adapter(tiny_llama_dir, root / name, seed, fields)
            for seed, (name, fields) in enumerate(ADAPTERS.items(), start=3)}  # fmt: skip
    keys_file = root / "keys.json"
    keys = {who: add_key(keys_file, tenant, role) for who, tenant, role in
            (("acme", "acme", "user"), ("globex", "globex", "user"), ("admin", "ops", "admin"))}  # fmt: skip
    config = EngineConfig(max_loras=4, max_lora_rank=16, max_num_seqs=4, max_num_batched_tokens=256)
    engine = Engine.from_config(ModelConfig(model=str(tiny_llama_dir), dtype="float32", device="cpu"), config)
    registry = engine.open_registry(SQLiteAdapterStore(root / "data"))
    app = create_app(engine, BASE, registry, KeyRing.load(keys_file))
    with TestClient(app) as client:
        api = Api(client, keys, dirs, tiny_llama_dir, app)
        for name in ADAPTERS:
            api.upload("acme", name, name)
        api.upload("globex", "secret", "a4")
        yield api
    engine.shutdown()


def peft_answer(
    api: Api, names: list[str], weights: list[float], seed: int = 0, **kwargs
) -> tuple[list, list]:
    """(greedy tokens, their logprobs) of peft's ``add_weighted_adapter`` adapter, torch's RNG seeded
    with ``seed`` as the merging starts (DARE: loraplex's ``composition_seed``)."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(api.base_dir), api.dirs[names[0]],
                                      adapter_name=names[0])  # fmt: skip
    for name in names[1:]:
        model.load_adapter(api.dirs[name], adapter_name=name)
    inject = model.base_model.inject_adapter

    def inject_then_seed(*args, **inject_kwargs):
        inject(*args, **inject_kwargs)
        torch.manual_seed(seed)

    model.base_model.inject_adapter = inject_then_seed
    model.add_weighted_adapter(names, weights, "mix", **kwargs)
    model.set_adapter("mix")
    model.eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=MAX_TOKENS, do_sample=False,
                             min_new_tokens=MAX_TOKENS, pad_token_id=0)[0, len(PROMPT):].tolist()  # fmt: skip
        logits = model(torch.tensor([PROMPT + out])).logits[0, len(PROMPT) - 1 : -1]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return out, [logprobs[i, t].item() for i, t in enumerate(out)]


def our_answer(response) -> tuple[str, list[float]]:
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return choice["text"], choice["logprobs"]["token_logprobs"]


def decode(api: Api, tokens: list[int]) -> str:
    return api.app.state.loraplex.engine.tokenizer.decode(tokens)


CASES = [
    ("cat", ["a4", "b4", "c8"], [0.7, 0.5, 1.0], {}),
    ("linear", ["a4", "b4"], [0.6, -0.4], {}),
    ("svd", ["c8", "a4"], [1.0, 0.8], {}),
    ("ties", ["a4", "b4"], [1.0, 0.7], {"density": 0.5}),
    ("dare_linear", ["a4", "b4"], [1.0, 1.0], {"density": 0.6, "composition_seed": 11}),
    ("dare_ties_svd", ["c8", "b4"], [0.9, 0.9], {"density": 0.7, "majority_sign_method": "frequency"}),
    ("magnitude_prune_svd", ["b4", "c8"], [1.0, 0.5], {"density": 0.4, "svd_rank": 6}),
    ("ties_svd", ["c8", "b4"], [1.0, 0.8], {"density": 0.6, "svd_rank": 4, "svd_clamp": 0.9}),
]


@pytest.mark.parametrize(("method", "names", "weights", "params"), CASES, ids=[c[0] for c in CASES])
def test_a_composition_answers_as_peft_add_weighted_adapter(api, method, names, weights, params):
    adapters = [{"name": n, "weight": w} for n, w in zip(names, weights, strict=True)]
    text, logprobs = our_answer(api.complete("acme", adapters=adapters, combination=method, **params))
    peft_kwargs = {k: v for k, v in params.items() if k != "composition_seed"}
    tokens, expected = peft_answer(api, names, weights, params.get("composition_seed", 0),
                                   combination_type=method, **peft_kwargs)  # fmt: skip
    assert text == decode(api, tokens)
    assert logprobs == pytest.approx(expected, abs=2e-4)
    base_text, _ = our_answer(api.complete("acme"))
    assert text != base_text, "the composition must change the answer"


def test_chat_takes_a_composition_too(api):
    body = {"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
            "temperature": 0, "ignore_eos": True, "adapters": [{"name": "a4"}, {"name": "b4"}],
            "combination": "cat"}  # fmt: skip
    composed = api.post("acme", "/v1/chat/completions", body)
    plain = api.post(
        "acme",
        "/v1/chat/completions",
        {k: v for k, v in body.items() if k not in ("adapters", "combination")},
    )
    assert composed.status_code == 200 and plain.status_code == 200, composed.text
    assert (
        composed.json()["choices"][0]["message"]["content"]
        != plain.json()["choices"][0]["message"]["content"]
    )


def test_a_composition_is_built_once_per_content(api):
    body = {"adapters": [{"name": "a4", "weight": 0.3}, {"name": "b4", "weight": 0.3}], "combination": "cat"}
    before = len(api.compositions)
    first = our_answer(api.complete("acme", **body))
    assert len(api.compositions) == before + 1
    assert our_answer(api.complete("acme", **body)) == first
    assert len(api.compositions) == before + 1, "the same content reuses the built adapter"
    other = {**body, "adapters": [{"name": "a4", "weight": 0.3}, {"name": "b4", "weight": 0.31}]}
    our_answer(api.complete("acme", **other))
    assert len(api.compositions) == before + 2, "other weights are another adapter"
    api.upload("acme", "a4", "a4")  # a new version with the same files: the same content
    assert our_answer(api.complete("acme", **body)) == first
    assert len(api.compositions) == before + 2
    api.upload("acme", "a4", "b4")  # other files are other content
    rebuilt = our_answer(api.complete("acme", **body))
    assert len(api.compositions) == before + 3 and rebuilt != first
    api.upload("acme", "a4", "a4")  # back to the original content: the first composition again
    assert our_answer(api.complete("acme", **body)) == first


def test_a_build_runs_on_a_thread_that_ends_with_it(api, monkeypatch):
    """Not on the request's pooled thread, which would keep the OpenMP team torch's ops start there
    (and slow every engine step after it: adapters/compositions.py)."""
    import adapters.compositions

    seen = []
    original = adapters.compositions.compose

    def recording(*args, **kwargs):
        seen.append(threading.current_thread())
        return original(*args, **kwargs)

    monkeypatch.setattr(adapters.compositions, "compose", recording)
    body = {"adapters": [{"name": "a4", "weight": 0.2}, {"name": "c8", "weight": 0.9}], "combination": "svd"}
    our_answer(api.complete("acme", **body))
    assert len(seen) == 1 and seen[0].name == "loraplex-compose"
    assert not seen[0].is_alive() and seen[0] not in threading.enumerate()


def test_compositions_batch_with_other_requests(api):
    """Compositions, a plain adapter and the base in flight together answer as they do alone."""
    requests = [
        {"adapters": [{"name": "a4"}, {"name": "c8"}], "combination": "cat"},
        {"adapters": [{"name": "b4", "weight": 0.5}, {"name": "c8"}], "combination": "svd"},
        {"model": "b4"},
        {},
    ]
    alone = [our_answer(api.complete("acme", **fields)) for fields in requests]
    with ThreadPoolExecutor(len(requests) * 2) as pool:
        together = list(pool.map(lambda f: our_answer(api.complete("acme", **f)), requests * 2))
    for (text, logprobs), (text_alone, logprobs_alone) in zip(together, alone * 2, strict=True):
        assert text == text_alone and logprobs == pytest.approx(logprobs_alone, abs=1e-4)


def test_tenants_compose_only_adapters_they_may_see(api):
    foreign = api.complete("acme", adapters=[{"name": "a4"}, {"name": "globex/secret"}], combination="cat")
    unknown = api.complete("acme", adapters=[{"name": "a4"}, {"name": "nope"}], combination="cat")
    for response in (foreign, unknown):
        assert response.status_code == 400 and response.json()["error"]["param"] == "adapters"
        assert "does not exist" in response.json()["error"]["message"]
    own = api.complete("globex", adapters=[{"name": "secret"}], combination="linear")
    assert own.status_code == 200, own.text
    admin = api.complete(
        "admin", adapters=[{"name": "globex/secret"}, {"name": "acme/b4"}], combination="cat"
    )
    assert admin.status_code == 200, admin.text


BAD = [
    ({"adapters": []}, "adapters"),
    ({"adapters": [{"name": "a4"}], "combination": "mean"}, "combination"),
    ({"adapters": [{"name": "a4"}, {"name": "c8"}], "combination": "linear"}, "combination"),
    ({"adapters": [{"name": "a4"}, {"name": "b4"}], "combination": "ties"}, "density"),
    ({"adapters": [{"name": "a4"}, {"name": "b4"}], "combination": "linear", "density": 0.5}, "density"),
    ({"adapters": [{"name": "a4"}, {"name": "b4"}], "combination": "dare_linear", "density": 2.0}, "density"),
    (
        {"adapters": [{"name": "a4"}, {"name": "b4"}, {"name": "c8"}, {"name": "c8"}], "combination": "cat"},
        "combination",
    ),  # rank 24 over --max-lora-rank 16
    ({"adapters": [{"name": "a4"}], "model": "a4"}, "model"),
    ({"combination": "cat"}, "combination"),
    ({"density": 0.5}, "density"),
    ({"adapters": [{"name": "a4", "weight": "1"}]}, "adapters"),
    ({"adapters": [{"name": "a4", "scale": 1}]}, "adapters"),
]


@pytest.mark.parametrize(("fields", "param"), BAD)
def test_bad_compositions_are_a_400_naming_the_parameter(api, fields, param):
    response = api.complete("acme", **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] is not None and error["param"].startswith(param), error
    assert our_answer(api.complete("acme"))  # and the server goes on serving


def test_a_weight_that_is_not_finite_is_refused(api):
    body = json.dumps({"model": BASE, "prompt": "x", "adapters": [{"name": "a4", "weight": 1.0}]})
    for bad in ("NaN", "Infinity", "-Infinity"):
        response = api.post("acme", "/v1/completions", body.replace("1.0", bad))
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"].startswith("adapters"), response.text


def test_a_saved_composition_is_a_peft_adapter(api, tmp_path):
    fields = {
        "adapters": [{"name": "a4", "weight": 0.8}, {"name": "b4", "weight": 0.6}],
        "combination": "cat",
    }
    saved = api.post("acme", "/v1/adapters/compose", {"name": "mix", **fields})
    assert saved.status_code == 201, saved.text
    info = saved.json()
    assert (info["id"], info["version"], info["rank"]) == ("mix", 1, 8)
    assert our_answer(api.complete("acme", model="mix")) == our_answer(api.complete("acme", **fields))
    record = api.app.state.loraplex.registry.resolve("acme", "mix")
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(api.base_dir), record.path
    ).eval()
    tokens, _ = peft_answer(api, ["a4", "b4"], [0.8, 0.6], combination_type="cat")
    with torch.no_grad():
        out = peft_model.generate(torch.tensor([PROMPT]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                  min_new_tokens=MAX_TOKENS, pad_token_id=0)  # fmt: skip
    out = out[0, len(PROMPT) :].tolist()
    assert out == tokens, "peft loads the saved files back as the same adapter"
    again = api.post("acme", "/v1/adapters/compose", {"name": "mix", **fields})
    assert again.status_code == 201 and again.json()["version"] == 2
    refused = api.post(
        "acme", "/v1/adapters/compose", {"name": "mix2", "adapters": [{"name": "globex/secret"}]}
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "adapters"
    foreign_tenant = api.post("acme", "/v1/adapters/compose", {"name": "m", "tenant": "globex", **fields})
    assert foreign_tenant.status_code == 403
