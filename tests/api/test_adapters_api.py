"""Adapter administration over HTTP with API keys: two tenants and an admin, real files, real engine.

The app runs in-process (Starlette's TestClient) on a real Engine over a tiny Llama, with a real
SQLite store and a keys file written by ``add_key``; adapters are saved by peft.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adapters.store import SQLiteAdapterStore
from adapters.tenants import KeyRing, add_key
from server.api.app import create_app
from server.config import EngineConfig, ModelConfig
from server.engine.engine import Engine
from tests.engine.test_engine_parity import save_peft_adapter

BASE = "tiny"
GREEDY = {"temperature": 0, "ignore_eos": True, "max_tokens": 8, "prompt": "Hello"}


class Api:
    """A TestClient per key, plus the files the tests upload."""

    def __init__(self, client: TestClient, keys: dict[str, str], adapters: dict[str, Path], roots: Path):
        self.client, self.keys, self.adapters, self.roots = client, keys, adapters, roots

    def call(self, who: str | None, method: str, path: str, **kwargs):
        headers = {} if who is None else {"Authorization": f"Bearer {self.keys[who]}"}
        return self.client.request(method, path, headers=headers, **kwargs)

    def upload(self, who: str, name: str, adapter: str, **form):
        directory = self.adapters[adapter]
        files = [("files", (p.name, p.read_bytes())) for p in sorted(directory.iterdir())
                 if p.name in ("adapter_config.json", "adapter_model.safetensors")]  # fmt: skip
        return self.call(who, "POST", "/v1/adapters", data={"name": name, **form}, files=files)

    def complete(self, who: str, model: str):
        return self.call(who, "POST", "/v1/completions", json={"model": model, **GREEDY})


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_llama_dir) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("admin-api")
    adapters = {
        name: save_peft_adapter(
            tiny_llama_dir, root / name, seed=seed, r=4, target_modules=["q_proj", "v_proj"]
        )
        for name, seed in (("first", 11), ("second", 12), ("third", 13))
    }
    (root / "roots").mkdir()
    shutil.copytree(adapters["third"], root / "roots" / "third")
    keys_file = root / "keys.json"
    keys = {who: add_key(keys_file, tenant, role) for who, tenant, role in
            (("acme", "acme", "user"), ("globex", "globex", "user"), ("admin", "ops", "admin"))}  # fmt: skip
    config = EngineConfig(max_loras=2, max_lora_rank=8, max_num_seqs=4, max_num_batched_tokens=256)
    engine = Engine.from_config(ModelConfig(model=str(tiny_llama_dir), dtype="float32", device="cpu"), config)
    store = SQLiteAdapterStore(root / "data", allowed_roots=[root / "roots"])
    registry = engine.open_registry(store)
    app = create_app(engine, BASE, registry, KeyRing.load(keys_file))
    with TestClient(app) as client:
        yield Api(client, keys, adapters, root / "roots")
    engine.shutdown()


def text_of(response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def error_of(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def test_keys_are_required_and_checked(api):
    error_of(api.call(None, "GET", "/v1/models"), 401, "invalid_api_key")
    api.keys["forged"] = "lpx-not-a-real-key"
    error_of(api.call("forged", "POST", "/v1/completions", json={"model": BASE, **GREEDY}), 401)
    assert api.call(None, "GET", "/health").status_code == 200, "probes need no key"
    assert api.call("acme", "GET", "/v1/models").json()["data"][0]["id"] == BASE


def test_upload_use_update_delete_across_two_tenants(api):
    base_text = text_of(api.complete("acme", BASE))
    created = api.upload("acme", "bot", "first")
    assert created.status_code == 201, created.text
    record = created.json()
    assert (record["id"], record["tenant"], record["version"], record["rank"]) == ("bot", "acme", 1, 4)
    assert record["target_modules"] == ["q_proj", "v_proj"] and len(record["sha256"]) == 64
    first_text = text_of(api.complete("acme", "bot"))
    assert first_text != base_text
    # globex can neither see nor use acme's adapter: it looks exactly like an unknown name
    unknown = error_of(api.complete("globex", "no-such-adapter"), 404, "model_not_found")
    hidden = error_of(api.complete("globex", "bot"), 404, "model_not_found")
    assert hidden["message"] == unknown["message"].replace("no-such-adapter", "bot")
    error_of(api.complete("globex", "acme/bot"), 404, "model_not_found")
    error_of(api.call("globex", "GET", "/v1/adapters/bot"), 404, "model_not_found")
    assert [m["id"] for m in api.call("globex", "GET", "/v1/models").json()["data"]] == [BASE]
    # globex's own "bot" is a different adapter, and acme cannot see it either
    assert api.upload("globex", "bot", "second").status_code == 201
    globex_text = text_of(api.complete("globex", "bot"))
    assert globex_text != first_text and text_of(api.complete("acme", "bot")) == first_text
    # a new version replaces the old for new requests
    updated = api.upload("acme", "bot", "second").json()
    assert updated["version"] == 2 and updated["sha256"] != record["sha256"]
    assert text_of(api.complete("acme", "bot")) == globex_text
    # the admin sees both tenants, and may address tenant/name
    listed = {(a["tenant"], a["name"]) for a in api.call("admin", "GET", "/v1/adapters").json()["data"]}
    assert {("acme", "bot"), ("globex", "bot")} <= listed
    assert text_of(api.complete("admin", "globex/bot")) == globex_text
    deleted = api.call("acme", "DELETE", "/v1/adapters/bot")
    assert deleted.status_code == 200 and deleted.json()["versions"] == [1, 2]
    error_of(api.complete("acme", "bot"), 404, "model_not_found")
    assert text_of(api.complete("globex", "bot")) == globex_text, "globex's adapter is untouched"


def test_users_cannot_act_for_other_tenants_or_pin(api):
    error_of(api.upload("acme", "x", "first", tenant="globex"), 403, "permission_denied")
    error_of(api.call("acme", "GET", "/v1/adapters", params={"tenant": "globex"}), 403)
    assert api.upload("acme", "pinme", "first").status_code == 201
    error_of(api.call("acme", "POST", "/v1/adapters/pinme/pin"), 403, "permission_denied")
    pinned = api.call("admin", "POST", "/v1/adapters/pinme/pin", params={"tenant": "acme"})
    assert pinned.status_code == 200 and pinned.json()["pinned"] is True
    unpinned = api.call("admin", "POST", "/v1/adapters/pinme/unpin", params={"tenant": "acme"})
    assert unpinned.json()["pinned"] is False


@pytest.mark.parametrize(
    "files, status, code, fragment",
    [
        ([("files", ("adapter_config.json", b"{}"))], 422, "invalid_adapter", "missing file"),
        ([("files", ("adapter_config.json", b"not json")), ("files", ("adapter_model.safetensors", b"x"))],
         422, "invalid_adapter", "not valid JSON"),
        ([("files", ("adapter_model.bin", b"\x80\x04pickle"))], 422, "invalid_adapter", "pickle"),
    ],
)  # fmt: skip
def test_bad_uploads_are_422_with_the_reason(api, files, status, code, fragment):
    response = api.call("acme", "POST", "/v1/adapters", data={"name": "broken"}, files=files)
    assert fragment in error_of(response, status, code)["message"]
    error_of(api.call("acme", "GET", "/v1/adapters/broken"), 404)


def test_bad_adapter_name_is_a_clear_error(api):
    error = error_of(api.upload("acme", "../etc", "first"), 422, "invalid_adapter")
    assert "may only contain" in error["message"]


def test_vllm_load_and_unload_lora_adapter(api):
    body = {"lora_name": "third", "lora_path": str(api.roots / "third")}
    error_of(api.call("acme", "POST", "/v1/load_lora_adapter", json=body), 403, "permission_denied")
    loaded = api.call("admin", "POST", "/v1/load_lora_adapter", json=body)
    assert loaded.status_code == 200 and "added successfully" in loaded.text
    assert text_of(api.complete("admin", "third")) != text_of(api.complete("admin", BASE))
    error_of(api.call("admin", "POST", "/v1/load_lora_adapter", json=body), 400)
    outside = {"lora_name": "evil", "lora_path": str(api.adapters["first"])}
    assert (
        "allowed"
        in error_of(api.call("admin", "POST", "/v1/load_lora_adapter", json=outside), 400)["message"]
    )
    unloaded = api.call("admin", "POST", "/v1/unload_lora_adapter", json={"lora_name": "third"})
    assert unloaded.status_code == 200 and "removed successfully" in unloaded.text
    error_of(api.complete("admin", "third"), 404, "model_not_found")
    assert (api.roots / "third" / "adapter_model.safetensors").exists(), "a local directory is never deleted"
    error_of(api.call("admin", "POST", "/v1/unload_lora_adapter", json={"lora_name": "third"}), 404)


def test_admin_merge_and_unmerge_keep_the_outputs(api):
    assert api.upload("acme", "hotbot", "second").status_code == 201
    side_path = text_of(api.complete("acme", "hotbot"))
    error_of(api.call("acme", "POST", "/v1/adapters/hotbot/merge"), 403, "permission_denied")
    merged = api.call("admin", "POST", "/v1/adapters/hotbot/merge", params={"tenant": "acme"})
    assert merged.status_code == 200, merged.text
    assert merged.json()["merged"] is True
    assert api.call("acme", "GET", "/v1/adapters/hotbot").json()["merged"] is True
    assert text_of(api.complete("acme", "hotbot")) == side_path
    unmerged = api.call("admin", "POST", "/v1/adapters/hotbot/unmerge", params={"tenant": "acme"})
    assert unmerged.status_code == 200 and unmerged.json()["merged"] is False
    error_of(api.call("admin", "POST", "/v1/adapters/hotbot/unmerge", params={"tenant": "acme"}), 409)
    assert text_of(api.complete("acme", "hotbot")) == side_path


def test_a_quantized_base_serves_adapters_but_makes_no_merged_copy(tmp_path, tiny_llama_dir):
    """--quantization int8: an uploaded adapter serves (its text differs from the base model's), the
    adapter says ``mergeable: false``, and an admin merge is a 409 that says why."""
    adapter = save_peft_adapter(
        tiny_llama_dir, tmp_path / "lora", seed=21, r=4, target_modules=["q_proj", "v_proj"]
    )
    config = EngineConfig(max_loras=2, max_lora_rank=8, max_num_seqs=4, max_num_batched_tokens=256)
    model = ModelConfig(model=str(tiny_llama_dir), dtype="float32", device="cpu", quantization="int8")
    engine = Engine.from_config(model, config)
    try:
        app = create_app(engine, BASE, engine.open_registry(SQLiteAdapterStore(tmp_path / "data")))
        with TestClient(app) as client:
            files = [("files", (p.name, p.read_bytes())) for p in sorted(adapter.iterdir())
                     if p.name in ("adapter_config.json", "adapter_model.safetensors")]  # fmt: skip
            uploaded = client.post("/v1/adapters", data={"name": "bot"}, files=files)
            assert uploaded.status_code == 201 and uploaded.json()["mergeable"] is False, uploaded.text
            answers = {m: client.post("/v1/completions", json={"model": m, **GREEDY}) for m in (BASE, "bot")}
            texts = {m: r.json()["choices"][0]["text"] for m, r in answers.items()}
            assert texts["bot"] != texts[BASE]
            merge = client.post("/v1/adapters/bot/merge")
            assert merge.status_code == 409 and merge.json()["error"]["code"] == "cannot_merge"
            assert "the base model is quantized (int8)" in merge.json()["error"]["message"]
    finally:
        engine.shutdown()
