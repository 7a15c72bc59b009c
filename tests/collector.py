"""A sink for engine outputs shared by the engine-level tests: gathers each request's deltas, waits for finishes."""

from __future__ import annotations

import threading

from jaxserve.engine import RequestOutput


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
