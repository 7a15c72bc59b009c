"""The gRPC server on the tiny model over 127.0.0.1: exact streaming, edge validation, limits, cancellation, the
JetStream-compatible API, health, reflection, auth, and graceful shutdown of a real `jaxserve-serve` process.

Servers run in-process on a free port, over one shared Runner (so each shape compiles once for the whole module).
Tests that need the engine to hold still block it inside a runner call with a `Gate`, never with sleeps.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import grpc
import inprocess_server
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from jaxserve.config import load_config
from jaxserve.engine import Engine
from jaxserve.generate import GenerationOptions, generate
from jaxserve.proto import jaxserve_pb2, jaxserve_pb2_grpc, jetstream_pb2, jetstream_pb2_grpc
from jaxserve.runner import Runner
from jaxserve.server.app import BackgroundServer
from jaxserve.tokenizer import ByteTokenizer

CONFIG = "configs/tiny.toml"
# Small limits keep every request within a few KV pages (few compiled shapes) and make the limits easy to cross.
BASE = ["runner.warmup=false", "server.port=0", "server.max_prompt_tokens=24", "server.max_tokens_cap=16",
        "server.max_stop_strings=4", "server.max_message_bytes=65536", "server.grace_period_s=60"]
BOS, EOS = 256, 257
TOK = ByteTokenizer()
TIMEOUT = 120


@pytest.fixture(scope="module")
def runner() -> Runner:
    return Runner(load_config(CONFIG, ["runner.warmup=false"]))


def serving(runner: Runner, *overrides: str) -> contextlib.AbstractContextManager[BackgroundServer]:
    """A started server over `runner` with this module's limits; overrides may change engine and server only."""
    return inprocess_server.serving(runner, CONFIG, [*BASE, *overrides])


@pytest.fixture(scope="module")
def server(runner: Runner) -> Iterator[BackgroundServer]:
    with serving(runner) as s:
        yield s


@pytest.fixture
def channel(server: BackgroundServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


class Gate:
    """Wraps a runner method so the engine thread blocks inside it until `open()`; `entered` is set on arrival.

    `monkeypatch` undoes the wrapping at the end of the test. Enter it after the server
    (`with serving(...) as srv, Gate(...) as gate:`) so that a failing test opens it before the server drains.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, runner: Runner, method: str, passes: int = 0) -> None:
        """`passes`: calls let through before the gate closes."""
        self.entered = threading.Event()
        self._open = threading.Event()
        original = getattr(runner, method)
        calls = []

        def gated(batch, *args):  # noqa: ANN001, ANN002, ANN202 (a StepBatch, maybe a Feed, in; Sampled out)
            calls.append(batch)
            if len(calls) > passes:
                self.entered.set()
                assert self._open.wait(TIMEOUT), "the test never opened the gate"
            return original(batch, *args)

        monkeypatch.setattr(runner, method, gated)

    def open(self) -> None:
        self._open.set()

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.open()


def spy_cancel(monkeypatch: pytest.MonkeyPatch, engine: Engine) -> threading.Event:
    """An event set once the server has asked the engine to cancel a request."""
    called = threading.Event()
    original = engine.cancel

    def cancel(request_id: str) -> None:
        original(request_id)
        called.set()

    monkeypatch.setattr(engine, "cancel", cancel)
    return called


def finished_count(engine: Engine, reason: str) -> float:
    return engine.metrics.registry.get_sample_value("jaxserve_requests_finished_total", {"reason": reason}) or 0.0


def stream(ch: grpc.Channel, **fields: object) -> list[jaxserve_pb2.GenerateResponse]:
    return list(jaxserve_pb2_grpc.JaxServeStub(ch).Generate(jaxserve_pb2.GenerateRequest(**fields), timeout=TIMEOUT))


def health_status(ch: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


# ----- generation -----


@pytest.mark.parametrize("as_text", [True, False], ids=["text", "token_ids"])
def test_generate_streams_the_offline_greedy_output(server: BackgroundServer, channel: grpc.Channel,
                                                     runner: Runner, as_text: bool) -> None:
    prompt = TOK.encode("hello world", add_bos=True)
    # The engine is idle between tests, so the offline path may borrow the shared runner's pool.
    expected = generate(runner, [prompt], [GenerationOptions(max_tokens=12)])[0]
    fields = {"text": "hello world"} if as_text else {"token_ids": prompt}
    msgs = stream(channel, **fields, max_tokens=12, ignore_eos=True, logprobs=2)
    assert [t for m in msgs for t in m.token_ids] == expected
    assert all(len(m.token_ids) == 1 and len(m.logprobs) == 1 and len(m.logprobs[0].top) == 2 for m in msgs)
    assert "".join(m.text for m in msgs) == TOK.decode(expected)
    assert [m.finish_reason for m in msgs[:-1]] == [jaxserve_pb2.FINISH_REASON_UNSPECIFIED] * (len(msgs) - 1)
    assert msgs[-1].finish_reason == jaxserve_pb2.FINISH_REASON_LENGTH
    assert (msgs[-1].usage.prompt_tokens, msgs[-1].usage.completion_tokens) == (len(prompt), 12)
    assert len({m.request_id for m in msgs}) == 1
    assert server.server.engine.allocator.num_used == 0


def test_stop_token_ends_the_stream_with_stop(channel: grpc.Channel, runner: Runner) -> None:
    prompt = TOK.encode("stop here", add_bos=True)
    expected = generate(runner, [prompt], [GenerationOptions(max_tokens=8)])[0]
    stop_at = expected.index(expected[2])
    msgs = stream(channel, token_ids=prompt, max_tokens=8, ignore_eos=True, stop_token_ids=[expected[2]],
                  request_id="client-chosen.id-1")
    assert [t for m in msgs for t in m.token_ids] == expected[: stop_at + 1]
    assert msgs[-1].finish_reason == jaxserve_pb2.FINISH_REASON_STOP
    assert msgs[-1].request_id == "client-chosen.id-1"


def test_tokenize_and_model_info(channel: grpc.Channel) -> None:
    stub = jaxserve_pb2_grpc.JaxServeStub(channel)
    assert list(stub.Tokenize(jaxserve_pb2.TokenizeRequest(text="hé", add_bos=True)).token_ids) == [BOS, 104, 195, 169]
    info = stub.GetModelInfo(jaxserve_pb2.GetModelInfoRequest())
    assert (info.model, info.vocab_size, info.max_seq_len, info.max_prompt_tokens, info.max_tokens_cap) == (
        "tiny", 264, 256, 24, 16)
    assert (info.page_size, info.bos_token_id, list(info.eos_token_ids), info.mesh.platform) == (8, BOS, [EOS], "cpu")


# ----- validation at the edge -----

G = jaxserve_pb2.GenerateRequest
BAD_REQUESTS = [
    ("empty prompt", G(), "text"),
    ("text and token_ids", G(text="hi", token_ids=[1, 2]), "token_ids"),
    ("prompt over the limit", G(token_ids=[1] * 25), "token_ids"),
    ("text over the limit", G(text="a" * 24), "text"),
    ("token id outside the vocab", G(token_ids=[BOS, 264]), "token_ids[1]"),
    ("negative token id", G(token_ids=[-1]), "token_ids[0]"),
    ("negative temperature", G(text="hi", temperature=-0.5), "temperature"),
    ("NaN temperature", G(text="hi", temperature=math.nan), "temperature"),
    ("infinite temperature", G(text="hi", temperature=math.inf), "temperature"),
    ("top_p 0", G(text="hi", top_p=0.0), "top_p"),
    ("top_p over 1", G(text="hi", top_p=1.5), "top_p"),
    ("negative top_k", G(text="hi", top_k=-1), "top_k"),
    ("max_tokens 0", G(text="hi", max_tokens=0), "max_tokens"),
    ("max_tokens over the cap", G(text="hi", max_tokens=17), "max_tokens"),
    ("logprobs over the max", G(text="hi", logprobs=6), "logprobs"),
    ("negative logprobs", G(text="hi", logprobs=-1), "logprobs"),
    ("too many stop strings", G(text="hi", stop=["a", "b", "c", "d", "e"]), "stop"),
    ("empty stop string", G(text="hi", stop=["x", ""]), "stop"),
    ("stop token id outside the vocab", G(text="hi", stop_token_ids=[264]), "stop_token_ids"),
    ("negative seed", G(text="hi", seed=-1), "seed"),
    ("seed over 32 bits", G(text="hi", seed=2**32), "seed"),
    ("bad request id", G(text="hi", request_id="no spaces allowed"), "request_id"),
    ("request id too long", G(text="hi", request_id="x" * 129), "request_id"),
]
D = jetstream_pb2.DecodeRequest
BAD_DECODES = [
    ("no content", D(max_tokens=4), "content"),
    ("max_tokens 0", D(text_content=D.TextContent(text="hi")), "max_tokens"),
    ("max_tokens over the cap", D(text_content=D.TextContent(text="hi"), max_tokens=17), "max_tokens"),
    ("lora adapter", D(text_content=D.TextContent(text="hi"), max_tokens=4, lora_adapter_id="a"), "lora_adapter_id"),
    ("too many samples", D(text_content=D.TextContent(text="hi"), max_tokens=4, num_samples=9), "num_samples"),
    ("token id outside the vocab", D(token_content=D.TokenContent(token_ids=[300]), max_tokens=4),
     "token_content.token_ids[0]"),
]


@pytest.fixture
def engine_untouched(server: BackgroundServer, monkeypatch: pytest.MonkeyPatch) -> None:
    def submit(*args: object) -> None:
        raise AssertionError("an invalid request reached the engine")

    monkeypatch.setattr(server.server.engine, "submit", submit)


@pytest.mark.usefixtures("engine_untouched")
@pytest.mark.parametrize(("case", "request_", "field"), BAD_REQUESTS, ids=[c for c, _, _ in BAD_REQUESTS])
def test_bad_request_is_invalid_argument_naming_the_field(channel: grpc.Channel, case: str,
                                                           request_: jaxserve_pb2.GenerateRequest, field: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(jaxserve_pb2_grpc.JaxServeStub(channel).Generate(request_, timeout=TIMEOUT))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
    assert err.value.details().startswith(f"{field}: "), err.value.details()


@pytest.mark.usefixtures("engine_untouched")
@pytest.mark.parametrize(("case", "request_", "field"), BAD_DECODES, ids=[c for c, _, _ in BAD_DECODES])
def test_bad_jetstream_decode_is_invalid_argument_naming_the_field(channel: grpc.Channel, case: str,
                                                                    request_: jetstream_pb2.DecodeRequest,
                                                                    field: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(jetstream_pb2_grpc.OrchestratorStub(channel).Decode(request_, timeout=TIMEOUT))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
    assert err.value.details().startswith(f"{field}: "), err.value.details()


def test_oversize_message_is_refused_by_the_transport(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stream(channel, text="x" * 70_000, max_tokens=1)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "65536" in err.value.details()


def test_server_still_serves_after_bad_requests(server: BackgroundServer, channel: grpc.Channel) -> None:
    for _, request_, _ in BAD_REQUESTS:
        with pytest.raises(grpc.RpcError):
            list(jaxserve_pb2_grpc.JaxServeStub(channel).Generate(request_, timeout=TIMEOUT))
    msgs = stream(channel, text="fine", max_tokens=3)
    assert msgs[-1].finish_reason in (jaxserve_pb2.FINISH_REASON_LENGTH, jaxserve_pb2.FINISH_REASON_STOP)
    assert server.server.engine.allocator.num_used == 0


# ----- the JetStream-compatible API -----


def test_jetstream_decode_streams_tokens_like_offline_generation(channel: grpc.Channel, runner: Runner) -> None:
    prompt = TOK.encode("jet", add_bos=True)
    expected = generate(runner, [prompt], [GenerationOptions(max_tokens=10, stop_token_ids=(EOS,))])[0]
    stub = jetstream_pb2_grpc.OrchestratorStub(channel)
    msgs = list(stub.Decode(D(token_content=D.TokenContent(token_ids=prompt), max_tokens=10, has_bos=True),
                            timeout=TIMEOUT))
    assert all(m.WhichOneof("content") == "stream_content" and len(m.stream_content.samples) == 1 for m in msgs)
    assert all(len(m.stream_content.samples[0].token_ids) == 1 for m in msgs)
    assert [t for m in msgs for t in m.stream_content.samples[0].token_ids] == expected
    assert all(m.stream_content.samples[0].text == "" for m in msgs)
    assert stub.HealthCheck(jetstream_pb2.HealthCheckRequest(), timeout=10).is_live


def test_jetstream_text_decode_adds_bos_and_zips_samples(channel: grpc.Channel, runner: Runner) -> None:
    prompt = TOK.encode("jet", add_bos=True)
    expected = generate(runner, [prompt], [GenerationOptions(max_tokens=10, stop_token_ids=(EOS,))])[0]
    stub = jetstream_pb2_grpc.OrchestratorStub(channel)
    msgs = list(stub.Decode(D(text_content=D.TextContent(text="jet"), max_tokens=10, num_samples=2),
                            timeout=TIMEOUT))
    for i in range(2):  # greedy by default, so both samples follow the offline output
        assert [t for m in msgs for t in m.stream_content.samples[i].token_ids] == expected
        assert "".join(m.stream_content.samples[i].text for m in msgs) == TOK.decode(expected)
    assert all(len(m.stream_content.samples) == 2 for m in msgs)


# ----- limits, cancellation, deadlines -----


def test_queue_overflow_is_resource_exhausted_and_the_server_survives(runner: Runner,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    with (serving(runner, "engine.max_waiting=1") as srv, Gate(monkeypatch, runner, "prefill") as gate,
          grpc.insecure_channel(srv.target) as ch):
        stub = jaxserve_pb2_grpc.JaxServeStub(ch)
        running = stub.Generate(G(text="first", max_tokens=2), timeout=TIMEOUT)
        assert gate.entered.wait(TIMEOUT)  # the engine holds "first" in its prefill: it left the queue
        queued = stub.Generate(G(text="second", max_tokens=2), timeout=TIMEOUT)
        assert srv.server.bridge.wait_inflight(lambda n: n == 2, TIMEOUT)  # "second" fills the one queue slot
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(G(text="third", max_tokens=2), timeout=TIMEOUT))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        gate.open()
        for call in (running, queued):
            assert list(call)[-1].finish_reason != jaxserve_pb2.FINISH_REASON_ERROR
        assert stream(ch, text="after", max_tokens=2)[-1].usage.completion_tokens >= 1
        assert srv.server.engine.is_alive


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_client_leaving_mid_stream_frees_its_pages(runner: Runner, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    with serving(runner) as srv, grpc.insecure_channel(srv.target) as ch:
        stream(ch, text="bye", max_tokens=2)  # compiles this prompt's shapes, so only the gate holds the stream
        engine = srv.server.engine
        cancelled = spy_cancel(monkeypatch, engine)
        # passes=1: the first decode step is dispatched before the prefill's token is read (asynchronous
        # scheduling), so the gate holds the second.
        with Gate(monkeypatch, runner, "decode", passes=1) as gate:
            call = jaxserve_pb2_grpc.JaxServeStub(ch).Generate(G(text="bye", max_tokens=16, ignore_eos=True),
                                                               timeout=TIMEOUT if how == "cancel" else 1.0)
            assert len(next(call).token_ids) == 1  # the prefill's token; the engine now blocks in a decode step
            assert gate.entered.wait(TIMEOUT)
            if how == "cancel":
                call.cancel()
            with pytest.raises(grpc.RpcError) as err:
                list(call)
            assert err.value.code() == (grpc.StatusCode.CANCELLED if how == "cancel" else
                                        grpc.StatusCode.DEADLINE_EXCEEDED)
            assert cancelled.wait(TIMEOUT)
        assert srv.server.bridge.wait_inflight(lambda n: n == 0, TIMEOUT)
        assert engine.allocator.num_used == 0
        assert finished_count(engine, "cancelled") == 1
        assert engine.metrics.registry.get_sample_value("jaxserve_generation_tokens_total") <= 2 + 2


# ----- health, reflection, auth -----


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"jaxserve.v1.JaxServe", "jetstream_proto.Orchestrator", "grpc.health.v1.Health"} <= services


def test_health_is_serving_then_not_serving_while_draining(runner: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    # passes=1: the first decode step is dispatched before the prefill's token is read (asynchronous scheduling).
    with (serving(runner) as srv, Gate(monkeypatch, runner, "decode", passes=1) as gate,
          grpc.insecure_channel(srv.target) as ch):
        assert health_status(ch) == health_status(ch, "jaxserve.v1.JaxServe") == health_pb2.HealthCheckResponse.SERVING
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stub = jaxserve_pb2_grpc.JaxServeStub(ch)
        inflight = stub.Generate(G(text="drain me", max_tokens=6, ignore_eos=True), timeout=TIMEOUT)
        first = next(inflight)
        assert gate.entered.wait(TIMEOUT)
        srv.server.request_stop()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        for rpc in (lambda: list(stub.Generate(G(text="late", max_tokens=2), timeout=TIMEOUT)),
                    lambda: stub.Tokenize(jaxserve_pb2.TokenizeRequest(text="late"), timeout=TIMEOUT)):
            with pytest.raises(grpc.RpcError) as err:
                rpc()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not jetstream_pb2_grpc.OrchestratorStub(ch).HealthCheck(jetstream_pb2.HealthCheckRequest()).is_live
        gate.open()
        rest = list(inflight)  # the in-flight request finishes in full
        assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) == 6
        assert rest[-1].finish_reason == jaxserve_pb2.FINISH_REASON_LENGTH
        assert srv.join(TIMEOUT) == 0


def test_grace_period_running_out_cancels_what_is_left_and_exits_0(runner: Runner,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with serving(runner, "server.grace_period_s=0.2") as srv, grpc.insecure_channel(srv.target) as ch:
        stream(ch, text="slow", max_tokens=2)  # compiles this prompt's shapes first
        cancelled = spy_cancel(monkeypatch, srv.server.engine)
        with Gate(monkeypatch, runner, "decode", passes=1) as gate:  # passes=1: as in the test above
            call = jaxserve_pb2_grpc.JaxServeStub(ch).Generate(G(text="slow", max_tokens=16, ignore_eos=True),
                                                               timeout=TIMEOUT)
            first = next(call)
            assert gate.entered.wait(TIMEOUT)
            srv.server.request_stop()
            assert cancelled.wait(TIMEOUT)  # the grace period ran out while the engine was held
        rest = list(call)
        assert rest[-1].finish_reason == jaxserve_pb2.FINISH_REASON_CANCELLED
        assert rest[-1].usage.completion_tokens == len(first.token_ids) + sum(len(m.token_ids) for m in rest) < 16
        assert srv.join(TIMEOUT) == 0


def test_engine_death_flips_health_and_exits_nonzero(runner: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    with serving(runner) as srv, grpc.insecure_channel(srv.target) as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

        def broken_plan(*args: object) -> None:
            raise RuntimeError("scheduler bug")

        monkeypatch.setattr(srv.server.engine.scheduler, "plan", broken_plan)
        call = jaxserve_pb2_grpc.JaxServeStub(ch).Generate(G(text="boom", max_tokens=2), timeout=TIMEOUT)
        assert next(call).finish_reason == jaxserve_pb2.FINISH_REASON_ERROR
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.INTERNAL and "scheduler bug" in err.value.details()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        assert srv.join(TIMEOUT) == 1


def test_auth_rejects_a_missing_or_wrong_token_and_leaves_health_open(runner: Runner) -> None:
    with serving(runner, 'server.auth_token="s3cret"') as srv, grpc.insecure_channel(srv.target) as ch:
        stub = jaxserve_pb2_grpc.JaxServeStub(ch)
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)):
            with pytest.raises(grpc.RpcError) as err:
                stub.Tokenize(jaxserve_pb2.TokenizeRequest(text="hi"), metadata=metadata, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(G(text="hi", max_tokens=1), metadata=metadata, timeout=10))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        good = (("authorization", "Bearer s3cret"),)
        assert stub.Tokenize(jaxserve_pb2.TokenizeRequest(text="hi"), metadata=good, timeout=10).token_ids == [104, 105]
        assert health_status(ch) == health_pb2.HealthCheckResponse.SERVING
        assert jetstream_pb2_grpc.OrchestratorStub(ch).HealthCheck(jetstream_pb2.HealthCheckRequest()).is_live


# ----- the real process -----


def test_sigterm_drains_an_inflight_stream_and_exits_0(tmp_path: os.PathLike) -> None:
    script = shutil.which("jaxserve-serve", path=os.path.dirname(sys.executable))
    command = [script] if script else [sys.executable, "-m", "jaxserve.cli.serve"]
    log = open(os.path.join(tmp_path, "serve.log"), "w+")  # noqa: SIM115 (read back after the process ends)
    proc = subprocess.Popen([*command, "--config", CONFIG, "--set", "runner.warmup=false", "--port", "0",
                             "--grace_period_s", "60"], stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert "starting tiny" in proc.stdout.readline()
        line = proc.stdout.readline()
        assert "serving tiny on 127.0.0.1:" in line, f"no ready line; log:\n{open(log.name).read()}"
        with grpc.insecure_channel(f"127.0.0.1:{int(line.rsplit(':', 1)[1])}") as ch:
            call = jaxserve_pb2_grpc.JaxServeStub(ch).Generate(G(text="sigterm", max_tokens=40, ignore_eos=True),
                                                               timeout=TIMEOUT)
            first = next(call)
            proc.send_signal(signal.SIGTERM)
            rest = list(call)
        assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) == 40
        assert rest[-1].finish_reason == jaxserve_pb2.FINISH_REASON_LENGTH
        assert proc.wait(TIMEOUT) == 0
        assert "draining: 1 requests in flight" in open(log.name).read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_sigterm_during_warmup_exits_0_at_once(tmp_path: os.PathLike) -> None:
    script = shutil.which("jaxserve-serve", path=os.path.dirname(sys.executable))
    command = [script] if script else [sys.executable, "-m", "jaxserve.cli.serve"]
    with open(os.path.join(tmp_path, "serve.log"), "w+") as log:
        proc = subprocess.Popen([*command, "--config", CONFIG, "--set", "runner.warmup=true", "--port", "0"],
                                stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            assert "starting tiny" in proc.stdout.readline()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(TIMEOUT) == 0
            assert "serving tiny" not in proc.stdout.read()  # it stopped before warm-up could finish
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
