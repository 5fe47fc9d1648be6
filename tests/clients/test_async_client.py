"""``AsyncClient`` against the real server: the same operations as the sync client, awaited."""

from __future__ import annotations

import asyncio

import pytest
from loraplex_client import AsyncClient, AuthenticationError, Client, NotFoundError

from tests.clients.conftest import BASE_MODEL, GREEDY, MESSAGES, Deployment


def test_async_adapter_administration(deployment: Deployment) -> None:
    async def main() -> None:
        async with AsyncClient(deployment.url, deployment.keys["user"]) as client:
            uploaded = await client.upload("async-parrot", deployment.other_adapter_dir, progress=False)
            assert (uploaded.id, uploaded.version) == ("async-parrot", 1)
            assert (await client.get_adapter("async-parrot")).sha256 == uploaded.sha256
            assert "async-parrot" in [a.id for a in await client.list_adapters()]
            assert "async-parrot" in [m.id for m in await client.models()]
            assert (await client.delete_adapter("async-parrot")).versions == [1]
            with pytest.raises(NotFoundError):
                await client.get_adapter("async-parrot")

    asyncio.run(main())


def test_async_generation_matches_the_sync_client(
    deployment: Deployment, client: Client, adapter: str
) -> None:
    async def main() -> tuple[str, ...]:
        async with AsyncClient(deployment.url, deployment.keys["user"]) as aclient:
            completion = await aclient.completions(adapter, "Hello", **GREEDY)
            stream = await aclient.completions(adapter, "Hello", stream=True, **GREEDY)
            streamed = "".join([chunk.text async for chunk in stream])
            chat = await aclient.chat(BASE_MODEL, MESSAGES, **GREEDY)
            async with await aclient.chat(BASE_MODEL, MESSAGES, stream=True, **GREEDY) as chat_stream:
                streamed_chat = "".join([chunk.content async for chunk in chat_stream])
            return completion.text, streamed, chat.content, streamed_chat

    completion, streamed, chat, streamed_chat = asyncio.run(main())
    assert completion == streamed == client.completions(adapter, "Hello", **GREEDY).text
    assert chat == streamed_chat == client.chat(BASE_MODEL, MESSAGES, **GREEDY).content


def test_async_typed_errors(deployment: Deployment) -> None:
    async def main() -> None:
        async with AsyncClient(deployment.url, deployment.keys["user"]) as client:
            with pytest.raises(NotFoundError) as info:
                await client.completions("no-such-model", "Hello", stream=True)
            assert info.value.code == "model_not_found"
        async with AsyncClient(deployment.url, "lpx-wrong") as client:
            with pytest.raises(AuthenticationError):
                await client.models()

    asyncio.run(main())
