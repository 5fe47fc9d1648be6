"""The async Engine API the HTTP layer calls: submit, stream, abort, adapters, text helpers."""

from __future__ import annotations

import asyncio

import pytest

from adapters.errors import UnknownAdapterError
from server.engine.engine import Engine
from server.engine.sampler import SamplingParams
from tests.engine.test_engine_parity import save_peft_adapter
from tests.engine.tiny import byte_level_tokenizer, make_core


@pytest.fixture
def engine(tiny_llama):
    eng = Engine(make_core(tiny_llama))
    yield eng
    eng.shutdown()


async def wait_idle(engine, timeout_s: float = 2.0) -> None:
    """Give the engine loop time to apply an abort."""
    for _ in range(int(timeout_s / 0.02)):
        if not engine.core.has_work:
            return
        await asyncio.sleep(0.02)


async def collect(stream):
    return [d async for d in stream]


def test_submit_streams_token_deltas_until_finish(engine):
    async def main():
        stream = await engine.submit(
            [256, 1, 2, 3], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        )
        return await collect(stream)

    deltas = asyncio.run(main())
    assert [len(d.token_ids) for d in deltas] == [1] * 6
    assert [d.finish_reason for d in deltas] == [None] * 5 + ["length"]
    assert deltas[-1].num_output_tokens == 6 and deltas[-1].num_prompt_tokens == 4


def test_concurrent_requests_with_adapters(engine, tiny_llama, tmp_path):
    path = save_peft_adapter(
        tiny_llama, tmp_path / "a", seed=5, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]
    )

    async def main():
        await engine.load_adapter("a", path)
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        streams = [await engine.submit([256, i, i + 1], params, "a" if i % 2 else None) for i in range(6)]
        return await asyncio.gather(*(collect(s) for s in streams))

    results = asyncio.run(main())
    assert all(r[-1].finish_reason == "length" and r[-1].num_output_tokens == 8 for r in results)


def test_closing_the_stream_aborts_and_frees_kv(engine):
    async def main():
        stream = await engine.submit(
            [256, 9, 9], SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        )
        async for _ in stream:
            break
        await stream.aclose()
        await wait_idle(engine)

    asyncio.run(main())
    allocator = engine.core.kv_cache.allocator
    assert not engine.core.has_work and allocator.num_free == allocator.num_blocks


def test_unknown_adapter_is_refused_at_submit(engine):
    async def main():
        await engine.submit([256, 1], SamplingParams(max_tokens=2), "missing")

    with pytest.raises(UnknownAdapterError):
        asyncio.run(main())
    assert engine.is_running


def test_stop_string_cuts_text_and_ends_request(engine):
    tok = byte_level_tokenizer()

    async def main():
        greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
        full = "".join([d.text async for d in await engine.submit([256, 65, 66], greedy)])
        stop = full[5:8]
        params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=(stop,))
        deltas = await collect(await engine.submit([256, 65, 66], params))
        return full, stop, deltas

    full, stop, deltas = asyncio.run(main())
    text = "".join(d.text for d in deltas)
    assert text == full[: full.index(stop)]
    assert deltas[-1].finish_reason == "stop"
    assert tok.decode([t for d in deltas for t in d.token_ids]).startswith(text)


def test_chat_template_and_generate_text(engine):
    ids = engine.encode_chat([{"role": "user", "content": "hi"}])
    assert engine.tokenizer.decode(ids) == "<s>user: hi\n<s>assistant: "
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    async def main():
        text = await engine.generate_text("hello", params)
        tokens = [
            t for d in await collect(await engine.submit(engine.encode("hello"), params)) for t in d.token_ids
        ]
        return text, tokens

    text, tokens = asyncio.run(main())
    assert text == engine.tokenizer.decode(tokens, skip_special_tokens=True)


def test_closing_an_unstarted_stream_aborts_and_forgets_it(engine):
    async def main():
        stream = await engine.submit(
            [256, 4, 4], SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        )
        await stream.aclose()
        await wait_idle(engine)

    asyncio.run(main())
    assert not engine.core.has_work and not engine._streams
