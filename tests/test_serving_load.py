"""The server under load over 127.0.0.1: many concurrent streams stay exact, random client cancellations free every
page, and a warmed-up server compiles nothing more across a randomized run (asserted through the metric)."""

from __future__ import annotations

import asyncio
import contextlib

import inprocess_server
import numpy as np
import pytest

from jaxserve.client import AsyncClient
from jaxserve.config import load_config
from jaxserve.generate import GenerationOptions, generate
from jaxserve.runner import Runner
from jaxserve.server.app import BackgroundServer

CONFIG = "configs/tiny.toml"
TIMEOUT = 300


def serving(runner: Runner, *overrides: str) -> contextlib.AbstractContextManager[BackgroundServer]:
    return inprocess_server.serving(runner, CONFIG, ["engine.max_waiting=1000", *overrides])


@pytest.fixture(scope="module")
def runner() -> Runner:
    return Runner(load_config(CONFIG, ["runner.warmup=false"]))


async def _tokens(client: AsyncClient, prompt: list[int], **options: object) -> list[int]:
    return [t async for delta in client.generate(prompt, timeout=TIMEOUT, **options) for t in delta.token_ids]


def test_64_concurrent_streams_each_equal_the_request_run_alone(runner: Runner) -> None:
    rng = np.random.RandomState(3)
    prompts = [[256, *map(int, rng.randint(0, 256, rng.randint(1, 100)))] for _ in range(64)]
    lengths = [int(rng.randint(1, 30)) for _ in prompts]

    async def run_all(target: str) -> list[list[int]]:
        async with AsyncClient(target) as client:
            return await asyncio.gather(*(_tokens(client, p, max_tokens=n, ignore_eos=True)
                                          for p, n in zip(prompts, lengths, strict=True)))

    with serving(runner, "runner.warmup=false") as server:
        streamed = asyncio.run(run_all(server.target))
        engine = server.server.engine
        assert engine.wait_idle(TIMEOUT)
        assert engine.allocator.num_used == 0
    for p, n, got in zip(prompts, lengths, streamed, strict=True):
        assert got == generate(runner, [p], [GenerationOptions(max_tokens=n)])[0]


def test_200_clients_leaving_at_random_points_free_every_page(runner: Runner) -> None:
    rng = np.random.RandomState(4)
    plans = [([256, *map(int, rng.randint(0, 256, rng.randint(1, 60)))], int(rng.randint(0, 12))) for _ in range(200)]

    async def leave_early(client: AsyncClient, prompt: list[int], after: int) -> None:
        seen = 0
        async with contextlib.aclosing(client.generate(prompt, max_tokens=30, ignore_eos=True,
                                                       timeout=TIMEOUT)) as stream:
            async for delta in stream:
                seen += len(delta.token_ids)
                if seen >= after:
                    break  # closing the stream cancels the RPC

    async def run_all(target: str) -> None:
        async with AsyncClient(target) as client:
            await asyncio.gather(*(leave_early(client, p, k) for p, k in plans))

    with serving(runner, "runner.warmup=false") as server:
        asyncio.run(run_all(server.target))
        engine = server.server.engine
        assert engine.wait_idle(TIMEOUT)
        assert engine.allocator.num_used == 0
        assert not engine._running and not engine._waiting
        cancelled = engine.metrics.registry.get_sample_value("jaxserve_requests_finished_total",
                                                             {"reason": "cancelled"})
        assert cancelled and cancelled > 100


def test_a_warmed_up_server_compiles_nothing_across_200_random_requests() -> None:
    overrides = ["runner.max_seq_len=64", "server.max_prompt_tokens=40", "server.max_tokens_cap=24"]
    runner = Runner(load_config(CONFIG, overrides))
    rng = np.random.RandomState(5)
    requests = [([256, *map(int, rng.randint(0, 256, rng.randint(0, 39)))],
                 {"max_tokens": int(rng.randint(1, 24)), "temperature": float(rng.choice([0.0, 0.7, 1.3])),
                  "top_k": int(rng.choice([0, 5])), "top_p": float(rng.choice([1.0, 0.9])),
                  "seed": int(rng.randint(99)), "logprobs": int(rng.choice([0, 2]))}) for _ in range(200)]

    async def run_all(target: str) -> None:
        async with AsyncClient(target) as client:
            for start in range(0, len(requests), 25):  # waves of 25 exercise every batch bucket
                await asyncio.gather(*(_tokens(client, p, **o) for p, o in requests[start:start + 25]))

    with serving(runner, *overrides) as server:
        warm = runner.compile_count  # the server warmed every bucket before it started serving
        assert warm > 0
        asyncio.run(run_all(server.target))
        assert server.server.engine.wait_idle(TIMEOUT)
        # The engine refreshes the gauge after every step, so it holds the count as of the last request.
        assert server.server.engine.metrics.registry.get_sample_value("jaxserve_compilations") == warm
