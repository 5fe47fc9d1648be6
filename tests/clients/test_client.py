"""The sync ``Client`` against a real server: uploads, adapter admin, generation, streaming, errors."""

from __future__ import annotations

import pytest
from loraplex_client import (
    Adapter,
    AuthenticationError,
    BadRequestError,
    ChatCompletion,
    Client,
    Completion,
    InvalidAdapterError,
    NotFoundError,
    PermissionDeniedError,
)

from tests.clients.conftest import ADAPTER, BASE_MODEL, GREEDY, MESSAGES, USER_TENANT, Deployment


# ---- adapter administration ----
def test_upload_get_list_delete(deployment: Deployment, client: Client, capsys) -> None:
    uploaded = client.upload("parrot", deployment.other_adapter_dir, progress=False)
    assert capsys.readouterr().err == ""
    assert isinstance(uploaded, Adapter)
    assert (uploaded.id, uploaded.tenant, uploaded.version) == ("parrot", USER_TENANT, 1)
    assert (uploaded.rank, uploaded.alpha, uploaded.source) == (8, 16.0, "upload")
    assert sorted(uploaded.target_modules) == ["q_proj", "v_proj"]

    again = client.upload("parrot", deployment.other_adapter_dir, progress=True)
    progress = capsys.readouterr().err
    assert "upload parrot" in progress and "100%" in progress
    assert again.version == 2 and again.sha256 == uploaded.sha256

    assert client.get_adapter("parrot") == again
    assert "parrot" in [a.id for a in client.list_adapters()]
    assert "parrot" in [m.id for m in client.models()]

    deleted = client.delete_adapter("parrot")
    assert (deleted.id, deleted.deleted, sorted(deleted.versions)) == ("parrot", True, [1, 2])
    assert "parrot" not in [a.id for a in client.list_adapters()]


def test_models_lists_the_base_model_first_then_adapters(client: Client, adapter: str) -> None:
    models = client.models()
    assert models[0].id == BASE_MODEL and models[0].root == BASE_MODEL
    assert any(m.id == adapter and m.parent == BASE_MODEL for m in models)


def test_admin_sees_other_tenants_and_pins_with_tenant(deployment: Deployment, adapter: str) -> None:
    with deployment.client("admin") as admin:
        assert f"{USER_TENANT}/{adapter}" in [a.id for a in admin.list_adapters()]
        assert {a.tenant for a in admin.list_adapters(tenant=USER_TENANT)} == {USER_TENANT}
        assert admin.pin(adapter, tenant=USER_TENANT).pinned
        assert admin.get_adapter(adapter, tenant=USER_TENANT).pinned
        assert not admin.unpin(adapter, tenant=USER_TENANT).pinned


# ---- generation ----
def test_completions_base_and_adapter_differ(client: Client, adapter: str) -> None:
    base = client.completions(BASE_MODEL, "Hello", **GREEDY)
    tuned = client.completions(adapter, "Hello", **GREEDY)
    assert isinstance(base, Completion) and base.model == BASE_MODEL and tuned.model == adapter
    assert base.usage is not None and base.usage.completion_tokens == GREEDY["max_tokens"]
    assert base.choices[0].finish_reason == "length"
    assert base.text != tuned.text
    assert client.completions(adapter, "Hello", **GREEDY).text == tuned.text


@pytest.mark.parametrize("model", [BASE_MODEL, ADAPTER])
def test_streamed_completion_matches_the_whole_one(client: Client, adapter: str, model: str) -> None:
    whole = client.completions(model, "Hello", **GREEDY)
    options = {"include_usage": True}
    with client.completions(model, "Hello", stream=True, stream_options=options, **GREEDY) as stream:
        chunks = list(stream)
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_chat_base_and_adapter_differ(client: Client, adapter: str) -> None:
    base = client.chat(BASE_MODEL, MESSAGES, **GREEDY)
    tuned = client.chat(adapter, MESSAGES, **GREEDY)
    assert isinstance(base, ChatCompletion) and base.choices[0].message.role == "assistant"
    assert base.content != tuned.content


@pytest.mark.parametrize("model", [BASE_MODEL, ADAPTER])
def test_streamed_chat_matches_the_whole_one(client: Client, adapter: str, model: str) -> None:
    whole = client.chat(model, MESSAGES, **GREEDY)
    chunks = list(client.chat(model, MESSAGES, stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.content for c in chunks) == whole.content
    assert chunks[-1].choices[0].finish_reason == "length"


# ---- typed errors ----
def test_unknown_model_is_not_found(client: Client) -> None:
    for call in (
        lambda: client.completions("no-such-model", "Hello"),
        lambda: client.chat("no-such-model", MESSAGES, stream=True),
        lambda: client.get_adapter("no-such-model"),
    ):
        with pytest.raises(NotFoundError) as info:
            call()
        assert (info.value.status, info.value.code) == (404, "model_not_found")
        assert "no-such-model" in info.value.message


def test_bad_or_missing_key_is_an_authentication_error(deployment: Deployment) -> None:
    for key in ("lpx-not-a-key", ""):
        with Client(deployment.url, key) as anonymous, pytest.raises(AuthenticationError) as info:
            anonymous.models()
        assert (info.value.status, info.value.code) == (401, "invalid_api_key")


def test_user_may_not_pin(client: Client, adapter: str) -> None:
    with pytest.raises(PermissionDeniedError) as info:
        client.pin(adapter)
    assert (info.value.status, info.value.code) == (403, "permission_denied")


def test_bad_upload_is_an_invalid_adapter_with_the_reason(deployment: Deployment, client: Client) -> None:
    with pytest.raises(InvalidAdapterError) as info:
        client.upload("broken", deployment.bad_adapter_dir, progress=False)
    assert (info.value.status, info.value.code, info.value.param) == (422, "invalid_adapter", "files")
    assert "use_dora" in info.value.message
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        client.upload("broken", deployment.bad_adapter_dir.parent, progress=False)


def test_refused_sampling_setting_is_a_bad_request(client: Client) -> None:
    with pytest.raises(BadRequestError) as info:
        client.completions(BASE_MODEL, "Hello", temperature="hot")
    assert info.value.status == 400 and info.value.param == "temperature"


def test_compose_composes_adapters_and_saves_a_composition(client: Client, adapter: str) -> None:
    """compose= at weight 1 answers as the adapter itself (one component is linear: itself);
    compose_adapter saves a composition, served under its own name as the request composed it."""
    alone = client.completions(adapter, "Hello", logprobs=1, **GREEDY)
    same = client.completions(BASE_MODEL, "Hello", compose={adapter: 1.0}, logprobs=1, **GREEDY)
    assert same.text == alone.text
    assert same.choices[0].logprobs.token_logprobs == pytest.approx(alone.choices[0].logprobs.token_logprobs,
                                                                    abs=1e-4)  # fmt: skip
    half = client.completions(BASE_MODEL, "Hello", compose=[(adapter, 0.5)], combination="linear", **GREEDY)
    chat = client.chat(BASE_MODEL, MESSAGES, compose=[adapter], combination="cat", **GREEDY)
    assert isinstance(chat, ChatCompletion) and chat.choices[0].message.content
    saved = client.compose_adapter("pirate-half", [(adapter, 0.5)], combination="linear")
    assert isinstance(saved, Adapter) and (saved.id, saved.version) == ("pirate-half", 1)
    assert client.completions("pirate-half", "Hello", **GREEDY).text == half.text
    with pytest.raises(BadRequestError) as info:
        client.completions(BASE_MODEL, "Hello", compose={adapter: 1.0}, combination="mean")
    assert (info.value.code, info.value.param) == ("invalid_composition", "combination")
    client.delete_adapter("pirate-half")
