"""What the engine-level tests share: a started engine on the tiny config over a shared runner, and a sink that
gathers each request's outputs and waits for finishes."""

from __future__ import annotations

import threading

from jaxserve.config import load_config
from jaxserve.engine import Engine, RequestOutput
from jaxserve.runner import Runner
from jaxserve.tokenizer import ByteTokenizer


def started_engine(runner: Runner, *overrides: str) -> Engine:
    """An engine on configs/tiny.toml plus `overrides`, started. Overrides only shape the engine (a smaller page
    allocator, queue limits, cache tiers); the runner's pool is a superset."""
    engine = Engine(load_config("configs/tiny.toml", ["runner.warmup=false", *overrides]), runner, ByteTokenizer())
    engine.start()
    return engine


class Collector:
    """Gathers every request's outputs; `wait` blocks until `count` requests finished."""

    def __init__(self) -> None:
        self.outputs: dict[str, list[RequestOutput]] = {}
        self._finished = 0
        self._cond = threading.Condition()

    def sink(self, out: RequestOutput) -> None:
        with self._cond:
            self.outputs.setdefault(out.request_id, []).append(out)
            if out.finish_reason is not None:
                self._finished += 1
                self._cond.notify_all()

    def wait(self, count: int, timeout: float = 300) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self._finished >= count, timeout), f"{self._finished}/{count} done"

    def tokens(self, rid: str) -> list[int]:
        return [t for o in self.outputs[rid] for t in o.token_ids]

    def text(self, rid: str) -> str:
        return "".join(o.text for o in self.outputs[rid])

    def final(self, rid: str) -> RequestOutput:
        return self.outputs[rid][-1]
