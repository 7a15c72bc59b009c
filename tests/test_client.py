"""The Python client and the jaxserve-client CLI against a real server on 127.0.0.1 (tiny model, random weights)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator

import grpc
import pytest

from jaxserve.client import AsyncClient, Client
from jaxserve.config import load_config
from jaxserve.engine import Engine
from jaxserve.generate import GenerationOptions, generate
from jaxserve.runner import Runner
from jaxserve.server.app import BackgroundServer, Server
from jaxserve.tokenizer import ByteTokenizer

CONFIG = "configs/tiny.toml"
BASE = ["runner.warmup=false", "server.port=0", "server.max_tokens_cap=16"]
TOK = ByteTokenizer()
TIMEOUT = 120


@pytest.fixture(scope="module")
def runner() -> Runner:
    return Runner(load_config(CONFIG, ["runner.warmup=false"]))


def _start(runner: Runner, *overrides: str) -> BackgroundServer:
    config = load_config(CONFIG, [*BASE, *overrides])
    server = BackgroundServer(Server(config, Engine(config, runner, TOK), TOK))
    server.start(timeout=TIMEOUT)
    return server


@pytest.fixture(scope="module")
def server(runner: Runner) -> Iterator[BackgroundServer]:
    srv = _start(runner)
    yield srv
    srv.stop(timeout=TIMEOUT)


def _expected(runner: Runner, text: str, max_tokens: int) -> list[int]:
    # The server's engine is idle between tests, so the offline path may borrow the shared runner's pool.
    return generate(runner, [TOK.encode(text, add_bos=True)], [GenerationOptions(max_tokens=max_tokens)])[0]


def test_sync_generate_streams_the_greedy_output(server: BackgroundServer, runner: Runner) -> None:
    expected = _expected(runner, "client", 10)
    with Client(server.target) as client:
        deltas = list(client.generate("client", max_tokens=10, ignore_eos=True, logprobs=1, timeout=TIMEOUT))
        assert [t for d in deltas for t in d.token_ids] == expected
        assert "".join(d.text for d in deltas) == TOK.decode(expected)
        assert all(len(d.logprobs) == 1 and d.logprobs[0].top[0][0] == d.token_ids[0] for d in deltas)
        assert [d.finish_reason for d in deltas] == [None] * 9 + ["length"]
        assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 10
        assert client.tokenize("ab", add_bos=True) == [256, 97, 98]
        assert client.model_info().max_tokens_cap == 16


def test_async_generate_matches_the_sync_client(server: BackgroundServer, runner: Runner) -> None:
    expected = _expected(runner, "async", 8)

    async def run() -> tuple[list[int], list[int], str]:
        async with AsyncClient(server.target) as client:
            ids = [t async for d in client.generate("async", max_tokens=8, ignore_eos=True) for t in d.token_ids]
            return ids, await client.tokenize("a"), (await client.model_info()).model

    assert asyncio.run(run()) == (expected, [97], "tiny")


def test_sampling_with_a_seed_is_reproducible(server: BackgroundServer) -> None:
    with Client(server.target) as client:
        runs = [[t for d in client.generate([256, 1, 2, 3], max_tokens=6, temperature=1.0, top_k=50, top_p=0.9,
                                            seed=7, ignore_eos=True) for t in d.token_ids] for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 6


def test_invalid_request_raises_with_the_field(server: BackgroundServer) -> None:
    with Client(server.target) as client, pytest.raises(grpc.RpcError) as err:
        list(client.generate("x", max_tokens=17))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("max_tokens: ")


def test_closing_the_stream_early_frees_the_pages(server: BackgroundServer, runner: Runner,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    engine = server.server.engine
    cancelled = threading.Event()
    original_cancel = engine.cancel
    monkeypatch.setattr(engine, "cancel", lambda rid: (original_cancel(rid), cancelled.set()))
    gate, entered = threading.Event(), threading.Event()
    original_decode = runner.decode

    calls = []

    def gated_decode(batch, *args):  # noqa: ANN001, ANN002, ANN202 (holds the engine after the first token)
        # From the second decode call on: with asynchronous scheduling the first token is read after the first
        # decode step is dispatched.
        calls.append(batch)
        if len(calls) > 1:
            entered.set()
            assert gate.wait(TIMEOUT)
        return original_decode(batch, *args)

    with Client(server.target) as client:
        list(client.generate("early", max_tokens=2))  # compiles this prompt's shapes first
        monkeypatch.setattr(runner, "decode", gated_decode)
        try:
            stream = client.generate("early", max_tokens=16, ignore_eos=True)
            assert len(next(stream).token_ids) == 1
            assert entered.wait(TIMEOUT)
            stream.close()  # what leaving a `for` loop early does once the generator is collected
            assert cancelled.wait(TIMEOUT)
        finally:
            gate.set()
    assert server.server.bridge.wait_inflight(lambda n: n == 0, TIMEOUT)
    assert engine.allocator.num_used == 0


def test_tls_and_token(runner: Runner, tmp_path: os.PathLike) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl binary to make a certificate")
    cert, key = os.path.join(tmp_path, "cert.pem"), os.path.join(tmp_path, "key.pem")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    srv = _start(runner, f'server.tls_cert="{cert}"', f'server.tls_key="{key}"', 'server.auth_token="tok"')
    try:
        with open(cert, "rb") as f:
            root = f.read()
        with Client(srv.target, root_certificates=root, server_name="localhost", token="tok") as client:
            assert client.tokenize("hi") == [104, 105]
        with Client(srv.target, root_certificates=root, server_name="localhost") as client, \
                pytest.raises(grpc.RpcError) as err:
            client.tokenize("hi")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(srv.target, token="tok") as client, pytest.raises(grpc.RpcError) as err:
            client.tokenize("hi", timeout=10)  # plaintext against a TLS port never connects
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        assert srv.stop(timeout=TIMEOUT) == 0


def test_cli_prints_the_streamed_text(server: BackgroundServer, runner: Runner) -> None:
    expected = TOK.decode(_expected(runner, "cli", 6))
    script = shutil.which("jaxserve-client", path=os.path.dirname(sys.executable))
    command = [script] if script else [sys.executable, "-m", "jaxserve.cli.client"]
    done = subprocess.run([*command, "--target", server.target, "--prompt", "cli", "--max_tokens", "6",
                           "--ignore_eos"], capture_output=True, timeout=TIMEOUT, check=True,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert done.stdout.decode("utf-8") == expected + "\n"
    assert b"[length: 4 prompt (0 cached: 0 device, 0 host, 0 disk) + 6 generated tokens]" in done.stderr
