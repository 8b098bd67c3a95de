"""AsyncEngine: the engine loop on its own thread, streamed deltas, aborts on disconnect."""

from __future__ import annotations

import asyncio

import pytest

from inferflux import SamplingParams
from inferflux.async_engine import AsyncEngine
from inferflux.config import EngineConfig
from inferflux.engine import LLMEngine, merge_delta
from tests.test_engine import ARGS


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    eng = AsyncEngine(LLMEngine(EngineConfig(model=str(tiny_checkpoint("llama")), **ARGS)))
    yield eng
    eng.shutdown()
    assert not eng.is_running


async def _collect(engine: AsyncEngine, prompt, params, request_id):
    deltas, acc = [], None
    async for delta in engine.generate(prompt, params, request_id=request_id):
        deltas.append(delta)
        acc = merge_delta(acc, delta)
    return deltas, acc


def test_streamed_deltas_join_to_the_offline_result(engine: AsyncEngine) -> None:
    params = SamplingParams(temperature=0.9, seed=5, max_tokens=20, stop=["zz"], logprobs=2)

    async def main():
        return await asyncio.gather(
            *(_collect(engine, f"Stream number {i}", params, f"s{i}") for i in range(4))
        )

    results = asyncio.run(main())
    tok = engine.engine.tokenizer
    for i, (deltas, acc) in enumerate(results):
        assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
        seq = acc.outputs[0]
        assert "".join(d.outputs[0].text for d in deltas) == seq.text
        assert len(seq.logprobs) == len(seq.token_ids)
        # The same request run offline (same seed) gives the same tokens and text.
        offline = engine.engine.prepare_request(f"off{i}", f"Stream number {i}", params)
        assert offline.prompt_token_ids == acc.prompt_token_ids
        if seq.finish_reason == "length":
            full = tok.decode(acc.prompt_token_ids + seq.token_ids)
            assert full == tok.decode(acc.prompt_token_ids) + seq.text


def test_same_seed_same_stream_across_runs(engine: AsyncEngine) -> None:
    params = SamplingParams(temperature=1.0, seed=77, max_tokens=12, ignore_eos=True)

    async def main():
        a = await _collect(engine, "Seeded", params, "a")
        b = await _collect(engine, "Seeded", params, "b")
        return a[1], b[1]

    a, b = asyncio.run(main())
    assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_leaving_the_stream_aborts_and_frees_pages(engine: AsyncEngine) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True)

    async def main():
        got = 0
        async for _ in engine.generate(list(range(3, 40)), params, request_id="gone"):
            got += 1
            if got == 3:
                break  # the client went away
        for _ in range(200):  # the abort is applied between engine steps
            if not engine.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        return got

    assert asyncio.run(main()) == 3
    assert not engine.engine.has_unfinished_requests()
    assert engine.engine.scheduler.kv_cache_usage == 0.0


def test_cancelled_task_aborts_a_queued_request(engine: AsyncEngine) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)

    async def consume(rid):
        async for _ in engine.generate(list(range(5, 30)), params, request_id=rid):
            pass

    async def main():
        tasks = [asyncio.create_task(consume(f"c{i}")) for i in range(12)]  # > max_num_seqs
        await asyncio.sleep(0.3)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(300):
            if not engine.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert not engine.engine.has_unfinished_requests()
    assert engine.engine.scheduler.kv_cache_usage == 0.0


def test_bad_request_raises_in_the_caller(engine: AsyncEngine) -> None:
    async def main():
        async for _ in engine.generate([10**7], SamplingParams(), request_id="bad"):
            pass

    with pytest.raises(ValueError, match="prompt_token_ids"):
        asyncio.run(main())
    assert engine.is_running
