"""The two gRPC APIs over one engine: `jaxserve.v1.JaxServe` and JetStream-compatible `jetstream_proto.Orchestrator`.

Handlers validate at the edge (`validation`), stream engine outputs through the `bridge`, and raise domain errors that
`status.rpc_errors` maps to gRPC codes. Streaming handlers write with `context.write` inside the stream's `with` block,
so a cancelled RPC (client gone, deadline passed) always cancels its engine request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random

import grpc

from jaxserve.config import Config
from jaxserve.engine import Request, RequestOutput
from jaxserve.proto import jaxserve_pb2, jaxserve_pb2_grpc, jetstream_pb2, jetstream_pb2_grpc
from jaxserve.sequence import SamplingOptions
from jaxserve.server.bridge import EngineBridge, ServingState, new_request_id
from jaxserve.server.status import RequestFailedError, rpc_errors
from jaxserve.server.validation import SEED_LIMIT, Limits, RequestValidator

FINISH_REASONS = {
    None: jaxserve_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": jaxserve_pb2.FINISH_REASON_STOP,
    "length": jaxserve_pb2.FINISH_REASON_LENGTH,
    "cancelled": jaxserve_pb2.FINISH_REASON_CANCELLED,
    "error": jaxserve_pb2.FINISH_REASON_ERROR,
}


def _check_failed(out: RequestOutput) -> None:
    if out.finish_reason == "error":
        raise RequestFailedError(f"request {out.request_id} failed: {out.error or 'unknown engine error'}")


def generate_response(out: RequestOutput) -> jaxserve_pb2.GenerateResponse:
    """The wire form of one engine output."""
    msg = jaxserve_pb2.GenerateResponse(
        request_id=out.request_id, token_ids=out.token_ids, text=out.text,
        finish_reason=FINISH_REASONS[out.finish_reason], error=out.error or "")
    for lp in out.logprobs:
        msg.logprobs.add(logprob=lp.logprob, top=[jaxserve_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])
    if out.usage is not None:
        msg.usage.CopyFrom(jaxserve_pb2.Usage(prompt_tokens=out.usage.prompt_tokens,
                                              completion_tokens=out.usage.completion_tokens,
                                              cached_tokens=out.usage.cached_tokens,
                                              cached_device_tokens=out.usage.cached_device,
                                              cached_host_tokens=out.usage.cached_host,
                                              cached_disk_tokens=out.usage.cached_disk))
    return msg


def model_info(config: Config, limits: Limits, platform: str) -> jaxserve_pb2.ModelInfo:
    """GetModelInfo's answer for a replica serving `config`."""
    m = config.model
    return jaxserve_pb2.ModelInfo(
        model=m.name, max_seq_len=limits.max_seq_len, max_prompt_tokens=limits.max_prompt_tokens,
        max_tokens_cap=limits.max_tokens_cap, vocab_size=m.vocab_size,
        bos_token_id=-1 if limits.bos_id is None else limits.bos_id, eos_token_ids=list(m.eos_token_ids),
        mesh=jaxserve_pb2.MeshInfo(data=config.mesh.data, pipeline=config.mesh.pipeline, tensor=config.mesh.tensor,
                                   platform=platform),
        param_dtype=m.param_dtype, dtype=m.dtype, kv_cache_dtype=config.cache.dtype,
        page_size=config.cache.page_size, num_pages=config.cache.num_pages, max_batch=config.runner.max_batch,
        max_logprobs=limits.max_logprobs, max_stop_strings=limits.max_stop_strings)


class JaxServeService(jaxserve_pb2_grpc.JaxServeServicer):
    """`jaxserve.v1.JaxServe`: streamed generation, tokenization and model info."""

    def __init__(self, bridge: EngineBridge, validator: RequestValidator, info: jaxserve_pb2.ModelInfo) -> None:
        self._bridge = bridge
        self._validator = validator
        self._info = info

    @rpc_errors
    async def Generate(self, request: jaxserve_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        """Streams a request's token and text deltas; the last message has the finish reason and usage."""
        self._bridge.require_serving()
        engine_request = self._validator.generate(request, request.request_id or new_request_id())
        with self._bridge.open(engine_request) as outputs:
            async for out in outputs:
                await context.write(generate_response(out))
                _check_failed(out)

    @rpc_errors
    async def Tokenize(self, request: jaxserve_pb2.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> jaxserve_pb2.TokenizeResponse:
        """The server tokenizer's ids for a text."""
        self._bridge.require_serving()
        return jaxserve_pb2.TokenizeResponse(token_ids=self._validator.tokenize(request))

    @rpc_errors
    async def GetModelInfo(self, request: jaxserve_pb2.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> jaxserve_pb2.ModelInfo:
        """The served model, its limits and its layout."""
        self._bridge.require_serving()
        return self._info


class JetStreamService(jetstream_pb2_grpc.OrchestratorServicer):
    """`jetstream_proto.Orchestrator`, wire-compatible with JetStream so its clients and benchmark run unchanged.

    One `stream_content` message per generated step, sent as soon as the token exists (no `initial_content`, which
    JetStream itself never sends: clients time TTFT from the first message). With num_samples > 1 each sample is its
    own engine request with its own seed, and their steps are zipped; a sample that finished early is empty.
    """

    def __init__(self, bridge: EngineBridge, validator: RequestValidator, options: SamplingOptions) -> None:
        self._bridge = bridge
        self._validator = validator
        self._options = options

    @rpc_errors
    async def Decode(self, request: jetstream_pb2.DecodeRequest, context: grpc.aio.ServicerContext) -> None:
        """Streams the samples of one prompt step by step; text prompts get text and ids, token prompts ids."""
        self._bridge.require_serving()
        prompt, num_samples, options = self._validator.decode(request, self._options)
        with_text = request.WhichOneof("content") == "text_content"
        base_id = new_request_id()
        base_seed = random.getrandbits(32) if options.seed is None else options.seed
        with contextlib.ExitStack() as stack:
            streams = [stack.enter_context(self._bridge.open(Request(
                f"{base_id}-{i}", prompt, dataclasses.replace(options, seed=(base_seed + i) % SEED_LIMIT))))
                for i in range(num_samples)]
            live = list(range(num_samples))
            while live:
                samples = [jetstream_pb2.DecodeResponse.StreamContent.Sample() for _ in streams]
                for i in list(live):
                    out = await anext(streams[i])
                    _check_failed(out)
                    samples[i].token_ids.extend(out.token_ids)
                    if with_text:
                        samples[i].text = out.text
                    if out.finish_reason is not None:
                        live.remove(i)
                if any(s.token_ids or s.text for s in samples):
                    await context.write(jetstream_pb2.DecodeResponse(
                        stream_content=jetstream_pb2.DecodeResponse.StreamContent(samples=samples)))

    async def HealthCheck(self, request: jetstream_pb2.HealthCheckRequest,
                          context: grpc.aio.ServicerContext) -> jetstream_pb2.HealthCheckResponse:
        """Live while the replica serves and its engine loop runs."""
        return jetstream_pb2.HealthCheckResponse(
            is_live=self._bridge.state is ServingState.SERVING and self._bridge.engine.is_alive)
