"""Builds, starts and stops the grpc.aio server of one replica around an Engine.

Lifecycle: `start()` binds the port and answers health NOT_SERVING while the runner warms up, then starts the engine
and reports SERVING. `wait()` serves until `request_stop()` (SIGTERM/SIGINT in `jaxserve-serve`) or until the engine
loop dies. A stop drains: health NOT_SERVING, new RPCs UNAVAILABLE, in-flight requests finish within
`server.grace_period_s` (the rest are cancelled), exit status 0. A dead engine loop flips health to NOT_SERVING and
ends with exit status 1. Options: bearer-token auth, TLS, message-size limits (grpc's own RESOURCE_EXHAUSTED above
`server.max_message_bytes`), reflection.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
from absl import logging
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jaxserve.config import Config
from jaxserve.engine import Engine
from jaxserve.proto import jaxserve_pb2, jaxserve_pb2_grpc, jetstream_pb2, jetstream_pb2_grpc
from jaxserve.sequence import SamplingOptions
from jaxserve.server.auth import BearerTokenInterceptor
from jaxserve.server.bridge import EngineBridge, ServingState
from jaxserve.server.services import JaxServeService, JetStreamService, model_info
from jaxserve.server.validation import Limits, RequestValidator
from jaxserve.tokenizer import Tokenizer

SERVICE_NAMES = (
    jaxserve_pb2.DESCRIPTOR.services_by_name["JaxServe"].full_name,
    jetstream_pb2.DESCRIPTOR.services_by_name["Orchestrator"].full_name,
)
# How often the server checks that the engine loop is still alive.
ENGINE_POLL_S = 0.2
# After the engine has drained, how long handlers get to write their last messages before the RPCs are cut.
FLUSH_S = 5.0


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class Server:
    """One replica's gRPC server: both APIs, health and reflection over one (not yet started) Engine."""

    def __init__(self, config: Config, engine: Engine, tokenizer: Tokenizer,
                 jetstream_options: SamplingOptions | None = None) -> None:
        self.config = config
        self.engine = engine
        self.bridge = EngineBridge(engine)
        limits = Limits.from_config(config, tokenizer)
        self.validator = RequestValidator(limits, tokenizer)
        self._info = model_info(config, limits, engine.runner.mesh.devices.flat[0].platform)
        # JetStream clients cannot send sampling knobs: greedy by default, like JetStream's own default.
        self._jetstream_options = jetstream_options or SamplingOptions()
        self.port: int | None = None
        self._grpc: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None

    async def start(self) -> int:
        """Binds and starts serving; warms the runner (when configured) and starts the engine. Returns the port."""
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        s = self.config.server
        server = grpc.aio.server(
            interceptors=[BearerTokenInterceptor(s.auth_token)] if s.auth_token else [],
            options=[("grpc.max_receive_message_length", s.max_message_bytes),
                     ("grpc.max_send_message_length", s.max_message_bytes),
                     ("grpc.so_reuseport", 0)])
        jaxserve_pb2_grpc.add_JaxServeServicer_to_server(
            JaxServeService(self.bridge, self.validator, self._info), server)
        jetstream_pb2_grpc.add_OrchestratorServicer_to_server(
            JetStreamService(self.bridge, self.validator, self._jetstream_options), server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = _address(s.host, s.port)
        if s.tls_cert:
            credentials = grpc.ssl_server_credentials([(_read(s.tls_key), _read(s.tls_cert))])
            self.port = server.add_secure_port(address, credentials)
        else:
            self.port = server.add_insecure_port(address)
        await server.start()
        self._grpc = server
        logging.info("listening on %s (%s)", _address(s.host, self.port), "TLS" if s.tls_cert else "plaintext")
        try:
            if self.config.runner.warmup:
                logging.info("warming up the runner")
                await self._loop.run_in_executor(None, self.engine.runner.warmup)
            self.engine.start()
        except BaseException:
            await server.stop(0)
            raise
        self.bridge.state = ServingState.SERVING
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        logging.info("serving %s", self.config.model.name)
        return self.port

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        assert self._health is not None
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, status)

    def request_stop(self) -> None:
        """Asks a started server to drain and stop; callable from any thread and from signal handlers."""
        assert self._loop is not None and self._stop_requested is not None, "start() the server first"
        try:
            self._loop.call_soon_threadsafe(self._stop_requested.set)
        except RuntimeError:  # the loop is closed: the server has already stopped
            pass

    async def wait(self) -> int:
        """Serves until `request_stop()` or the engine loop dies, then shuts down. Returns the exit status."""
        assert self._stop_requested is not None, "start() the server first"
        stop = asyncio.ensure_future(self._stop_requested.wait())
        died = asyncio.ensure_future(self._watch_engine())
        await asyncio.wait({stop, died}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        died.cancel()
        if self.engine.is_alive:
            await self._drain()
        else:
            await self._fail()
        return 0 if self.engine.fatal_error is None else 1

    async def _watch_engine(self) -> None:
        while self.engine.is_alive:
            await asyncio.sleep(ENGINE_POLL_S)

    async def _stop_taking_requests(self) -> None:
        self.bridge.state = ServingState.DRAINING
        self.engine.stop_accepting()
        assert self._health is not None
        await self._health.enter_graceful_shutdown()

    async def _drain(self) -> None:
        grace = self.config.server.grace_period_s
        logging.info("draining: %d requests in flight, grace period %.1fs", self.bridge.num_inflight, grace)
        await self._stop_taking_requests()
        assert self._loop is not None and self._grpc is not None
        if not await self._loop.run_in_executor(None, self.engine.shutdown, grace):
            logging.warning("the grace period ran out: requests still running were cancelled")
        self.bridge.end_abandoned()
        await self._grpc.stop(FLUSH_S)
        logging.info("stopped")

    async def _fail(self) -> None:
        logging.error("the engine loop died (%r): health NOT_SERVING, shutting down", self.engine.fatal_error)
        await self._stop_taking_requests()
        assert self._grpc is not None
        await self._grpc.stop(FLUSH_S)


class BackgroundServer:
    """Runs a Server on an event loop in a thread of its own, for synchronous callers (notebooks, benchmarks, tests)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.exit_code: int | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="jaxserve-grpc", daemon=True)

    @property
    def target(self) -> str:
        """host:port to connect to."""
        return _address(self.server.config.server.host, self.server.port or 0)

    def start(self, timeout: float | None = None) -> int:
        """Starts serving (warm-up included); returns the bound port, or raises what `Server.start` raised."""
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"the server did not start within {timeout}s")
        if self._error is not None:
            raise self._error
        assert self.server.port is not None
        return self.server.port

    def _run(self) -> None:
        async def main() -> None:
            try:
                await self.server.start()
            except BaseException as e:  # handed to start()'s caller on its own thread
                self._error = e
                return
            finally:
                self._started.set()
            self.exit_code = await self.server.wait()

        asyncio.run(main())

    def join(self, timeout: float | None = None) -> int | None:
        """Waits for the server to stop by itself (its engine died); returns the exit status, None while running."""
        self._thread.join(timeout)
        return self.exit_code

    def stop(self, timeout: float | None = None) -> int | None:
        """Drains and stops the server; returns its exit status (None if it did not stop within `timeout`)."""
        if self._thread.is_alive() and self._error is None:
            self.server.request_stop()
        return self.join(timeout)
