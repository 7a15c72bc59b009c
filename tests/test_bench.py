"""jaxserve/bench and jaxserve-bench: statistics on known inputs, seeded workloads and their length distributions, the
prompts file loader, the driver's timing and failure accounting, and end-to-end runs against a real in-process server
on 127.0.0.1 (tiny model), one of them through the `jaxserve-bench` command itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest

from jaxserve.bench.driver import SKIPPED, Connection, LoadSpec, RequestRecord, drive, run_load
from jaxserve.bench.report import SLO, Distribution, format_summary, result_json, summarize, write_json
from jaxserve.bench.workload import (
    Conversation,
    LengthDistribution,
    PromptEntry,
    PromptsFileError,
    Turn,
    Vocabulary,
    Workload,
    file_workload,
    load_prompts_file,
    multiturn_workload,
    synthetic_workload,
)
from jaxserve.client import Delta
from jaxserve.config import load_config
from jaxserve.engine import Engine
from jaxserve.outputs import Usage
from jaxserve.runner import Runner
from jaxserve.server.app import BackgroundServer, Server
from jaxserve.tokenizer import ByteTokenizer

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "tiny.toml")
BOS, EOS, VOCAB = 256, 257, 264
TIMEOUT = 120


def record(ttft: float = 0.1, e2e: float = 1.0, tokens: int = 10, status: str = "OK", prompt: int = 5,
           start: float = 0.0) -> RequestRecord:
    """A finished request whose tokens arrived evenly after the first."""
    gaps = [(e2e - ttft) / (tokens - 1)] * (tokens - 1) if tokens > 1 else []
    return RequestRecord(0, 0, prompt, tokens, start_s=start, ttft_s=ttft, e2e_s=e2e, itl_s=gaps,
                         output_tokens=tokens, finish_reason="length", status=status)


# ----- statistics -----


def test_percentiles_interpolate_between_order_statistics() -> None:
    d = Distribution.of(range(1, 101))
    assert d is not None
    assert (d.count, d.mean, d.min, d.max) == (100, 50.5, 1.0, 100.0)
    assert (d.p50, d.p90, d.p99) == pytest.approx((50.5, 90.1, 99.01))
    one = Distribution.of([7.0])
    assert one is not None and (one.p50, one.p99) == (7.0, 7.0)
    assert Distribution.of([]) is None


def test_tpot_is_the_time_after_the_first_token_per_remaining_token() -> None:
    assert record(ttft=0.2, e2e=2.0, tokens=10).tpot_s == pytest.approx(0.2)
    assert record(tokens=1, e2e=0.1).tpot_s is None
    assert record(status="UNAVAILABLE").tpot_s is None


def test_summary_counts_only_completed_requests_in_throughput() -> None:
    records = [record(tokens=10, prompt=5), record(tokens=30, prompt=7), record(status="UNAVAILABLE", tokens=4),
               record(status="INVALID_ARGUMENT"), record(status="UNAVAILABLE")]
    s = summarize(records, duration_s=4.0)
    assert (s.num_requests, s.completed, s.failed) == (5, 2, 3)
    assert s.failures == {"INVALID_ARGUMENT": 1, "UNAVAILABLE": 2}
    assert (s.request_throughput, s.output_throughput, s.input_throughput) == (0.5, 10.0, 3.0)
    assert s.ttft_ms is not None and s.ttft_ms.count == 2
    assert s.itl_ms is not None and s.itl_ms.count == 9 + 29
    assert s.goodput is None and s.slo_attainment is None  # no SLO given


def test_goodput_counts_completed_requests_meeting_every_target() -> None:
    records = [
        record(ttft=0.1, e2e=1.0, tokens=10),  # TTFT 100 ms, TPOT 100 ms: meets both
        record(ttft=0.5, e2e=1.4, tokens=10),  # TTFT 500 ms: misses TTFT
        record(ttft=0.1, e2e=2.8, tokens=10),  # TPOT 300 ms: misses TPOT
        record(ttft=0.2, e2e=0.2, tokens=1),  # one token: no TPOT, meets TTFT
        record(status="DEADLINE_EXCEEDED"),
    ]
    s = summarize(records, duration_s=2.0, slo=SLO(ttft_ms=200, tpot_ms=150))
    assert s.goodput == pytest.approx(1.0) and s.slo_attainment == pytest.approx(2 / 5)
    assert summarize(records, 2.0, SLO(ttft_ms=200)).goodput == pytest.approx(1.5)
    assert summarize(records, 2.0, SLO(tpot_ms=150)).goodput == pytest.approx(1.5)


def test_report_and_json_are_written_in_full(tmp_path: Path) -> None:
    from jaxserve.bench.driver import LoadResult

    result = LoadResult([record(), record(status="UNAVAILABLE")], 2.0)
    summary = summarize(result.records, result.duration_s, SLO(ttft_ms=500))
    text = format_summary(summary)
    assert "1 / 1" in text and "UNAVAILABLE x1" in text and "Goodput" in text and "TTFT" in text
    path = tmp_path / "out" / "result.json"
    write_json(str(path), result_json(result, summary, {"request_rate": math.inf}))
    data = json.loads(path.read_text())
    assert data["meta"] == {"request_rate": None}  # strict JSON: no Infinity
    assert data["summary"]["completed"] == 1 and data["summary"]["failures"] == {"UNAVAILABLE": 1}
    assert [r["status"] for r in data["requests"]] == ["OK", "UNAVAILABLE"]
    assert data["requests"][0]["tpot_s"] == pytest.approx(0.1)


def test_plots_are_written_as_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from jaxserve.bench.plots import write_plots

    records = [record(start=0.5 * i) for i in range(6)] + [record(status="UNAVAILABLE")]
    paths = write_plots(records, str(tmp_path / "plots"))
    assert [Path(p).name for p in paths] == ["latency_cdf.png", "throughput.png"]
    assert all(Path(p).read_bytes().startswith(b"\x89PNG") for p in paths)


def test_plots_without_matplotlib_say_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jaxserve.bench import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(plots.PlotsUnavailableError, match=r"pip install 'jaxserve\[plots\]'"):
        plots.write_plots([record()], str(tmp_path))


# ----- workloads -----


def test_length_distributions_stay_in_their_ranges() -> None:
    rng = np.random.default_rng(0)
    assert LengthDistribution.parse("32").sample(rng, 5).tolist() == [32] * 5
    uniform = LengthDistribution.parse("uniform:3:6").sample(rng, 2000)
    assert set(uniform.tolist()) == {3, 4, 5, 6}  # both ends included
    normal = LengthDistribution.parse("normal:100:10").sample(rng, 5000)
    assert abs(normal.mean() - 100) < 1 and abs(normal.std() - 10) < 1
    assert LengthDistribution.normal(2, 50).sample(rng, 1000).min() == 1  # clipped, never 0 or negative
    for text in ("fixed:7", "uniform:1:9", "normal:5:1.5"):
        assert str(LengthDistribution.parse(text)) == text


@pytest.mark.parametrize("text", ["", "abc", "uniform:5", "uniform:9:3", "fixed:0", "normal:0:1", "normal:5:-1",
                                  "poisson:4", "uniform:1:x"])
def test_bad_length_distribution_is_a_clear_error(text: str) -> None:
    with pytest.raises(ValueError, match="length"):
        LengthDistribution.parse(text)


def test_vocabulary_never_draws_special_ids() -> None:
    ids = Vocabulary(8, (0, 3, 7)).sample(np.random.default_rng(0), 4000)
    assert set(ids) == {1, 2, 4, 5, 6}


def test_synthetic_workload_is_determined_by_its_seed() -> None:
    vocab = Vocabulary(VOCAB, (BOS, EOS))
    make = lambda seed: synthetic_workload(20, LengthDistribution.uniform(4, 12),  # noqa: E731
                                           LengthDistribution.uniform(2, 8), vocab, seed)
    assert make(1) == make(1)
    assert make(1) != make(2)
    w = make(1)
    assert w.num_requests == 20 and w.max_turns == 1
    for c in w.conversations:
        (turn,) = c.turns
        assert c.system == () and 4 <= len(turn.content) <= 12 and 2 <= turn.max_tokens <= 8
        assert not {BOS, EOS} & set(turn.content)


def test_multiturn_workload_shares_one_system_prompt() -> None:
    w = multiturn_workload(10, turns=4, system_len=16, input_len=LengthDistribution.fixed(5),
                           output_len=LengthDistribution.fixed(3), vocab=Vocabulary(VOCAB), seed=0)
    assert [len(c.turns) for c in w.conversations] == [4, 4, 2]
    assert len({c.system for c in w.conversations}) == 1 and len(w.conversations[0].system) == 16
    assert all(len(t.content) == 5 and t.max_tokens == 3 for c in w.conversations for t in c.turns)


def test_prompts_file_loads_json_lists_and_jsonl(tmp_path: Path) -> None:
    as_json = tmp_path / "p.json"
    as_json.write_text(json.dumps([{"prompt": "hello", "max_tokens": 4}, {"prompt": [1, 2, 3]}]))
    as_jsonl = tmp_path / "p.jsonl"
    as_jsonl.write_text('{"prompt": "hello", "max_tokens": 4}\n\n{"prompt": [1, 2, 3]}\n')
    expected = [PromptEntry("hello", 4), PromptEntry((1, 2, 3), None)]
    assert load_prompts_file(str(as_json)) == load_prompts_file(str(as_jsonl)) == expected
    w = file_workload(expected, None, LengthDistribution.fixed(9))
    assert [(c.system, c.turns) for c in w.conversations] == [("", (Turn("hello", 4),)), ((), (Turn((1, 2, 3), 9),))]
    with pytest.raises(PromptsFileError, match="holds 2 prompts, fewer than the 3 requests"):
        file_workload(expected, 3, LengthDistribution.fixed(9))


@pytest.mark.parametrize(("content", "message"), [
    (None, "does not exist"),
    ("", "holds no prompts"),
    ("[{\"prompt\": \"a\"}", "is not valid JSON"),
    ('{"prompt": "a"}\n{"prompt": ', "line 2 is not valid JSON"),
    ('[{"text": "a"}]', 'entry 0: expected an object with a "prompt"'),
    ('[{"prompt": ""}]', "must be a non-empty string or a list of token ids"),
    ('{"prompt": [1, -2]}', "line 1: \"prompt\" as a list must hold token ids"),
    ('{"prompt": "a", "max_tokens": 0}', '"max_tokens" must be a positive integer'),
    ('{"prompt": "a", "max_token": 3}', "unknown fields max_token"),
])
def test_bad_prompts_file_is_a_clear_error(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "prompts.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PromptsFileError, match=message):
        load_prompts_file(str(path))


def test_poisson_arrivals_are_seeded_at_the_requested_rate() -> None:
    times = LoadSpec(request_rate=50.0, seed=3).arrival_times(4000)
    assert times[0] == 0 and np.all(np.diff(times) >= 0)
    assert np.diff(times).mean() == pytest.approx(1 / 50, rel=0.05)
    assert np.array_equal(times, LoadSpec(request_rate=50.0, seed=3).arrival_times(4000))
    assert not LoadSpec().arrival_times(5).any()  # infinite rate: all at t=0
    with pytest.raises(ValueError, match="request_rate"):
        LoadSpec(request_rate=0)


# ----- the driver over a scripted client -----


class ScriptedClient:
    """Streams `max_tokens` one-token deltas per request (ids 100.., text "a".."); fails requests whose prompt
    contains `fail_on` after one token. Records every prompt it was sent."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.prompts: list[str | Sequence[int]] = []
        self.fail_on = fail_on

    async def generate(self, prompt: str | Sequence[int], *, timeout: float | None = None,
                       **options: object) -> AsyncIterator[Delta]:
        self.prompts.append(prompt)
        n = int(options["max_tokens"])  # type: ignore[call-overload]
        for i in range(n):
            if self.fail_on is not None and isinstance(prompt, str) and self.fail_on in prompt and i == 1:
                raise grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(),
                                           grpc.aio.Metadata(), details="queue full")
            last = i == n - 1
            yield Delta("r", [100 + i], chr(ord("a") + i), [], "length" if last else None, "",
                        Usage(len(prompt), n, 0) if last else None)


def test_driver_times_each_token_and_chains_the_turns_of_a_conversation() -> None:
    client = ScriptedClient()
    workload = Workload("w", (Conversation("SYS:", (Turn("x", 2), Turn("y", 3))),
                              Conversation((7, 8), (Turn((1,), 2), Turn((2,), 1)))))
    result = asyncio.run(drive(client, workload, LoadSpec(concurrency=1)))
    # Each turn's prompt is the conversation so far: system, earlier contents and replies, then the new content.
    assert client.prompts == ["SYS:x", "SYS:xaby", (7, 8, 1), (7, 8, 1, 100, 101, 2)]
    assert [(r.conversation, r.turn, r.output_tokens, r.prompt_tokens) for r in result.records] == [
        (0, 0, 2, 5), (0, 1, 3, 8), (1, 0, 2, 3), (1, 1, 1, 6)]
    for r in result.records:
        assert r.is_ok and r.finish_reason == "length" and len(r.itl_s) == r.output_tokens - 1
        assert 0 <= r.start_s and 0 < r.ttft_s <= r.e2e_s <= result.duration_s  # type: ignore[operator]
    # concurrency 1: the second conversation starts after the first has finished
    first, second = result.records[1], result.records[2]
    assert second.start_s >= first.start_s + first.e2e_s  # type: ignore[operator]


def test_a_failed_turn_is_recorded_with_its_status_and_skips_the_rest_of_its_conversation() -> None:
    client = ScriptedClient(fail_on="bad")
    workload = Workload("w", (Conversation("", (Turn("bad", 3), Turn("next", 2))), Conversation("", (Turn("ok", 2),))))
    result = asyncio.run(drive(client, workload, LoadSpec()))
    statuses = [(r.status, r.output_tokens) for r in result.records]
    assert statuses == [("RESOURCE_EXHAUSTED", 1), (SKIPPED, 0), ("OK", 2)]
    assert result.records[0].error == "queue full" and len(client.prompts) == 2  # the skipped turn was never sent
    assert summarize(result.records, result.duration_s).failures == {"RESOURCE_EXHAUSTED": 1, SKIPPED: 1}


# ----- end to end against a real server -----


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    config = load_config(CONFIG, ["runner.warmup=false", "server.port=0"])
    tokenizer = ByteTokenizer()
    background = BackgroundServer(Server(config, Engine(config, Runner(config), tokenizer), tokenizer))
    background.start(timeout=TIMEOUT)
    yield background
    background.stop(timeout=TIMEOUT)


def test_bench_command_runs_a_synthetic_workload_end_to_end(server: BackgroundServer, tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    result = subprocess.run(
        [sys.executable, "-m", "jaxserve.cli.bench", f"--target={server.target}", "--num_requests=6",
         "--input_len=uniform:4:12", "--output_len=uniform:2:8", "--ignore_eos", "--concurrency=3", "--seed=5",
         "--slo_ttft_ms=60000", "--slo_tpot_ms=60000", "--noprogress", f"--json_out={out}"],
        capture_output=True, text=True, cwd=REPO, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "Requests completed / failed" in result.stdout and "6 / 0" in result.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["model"] == "tiny" and data["meta"]["num_requests"] == 6
    summary, requests = data["summary"], data["requests"]
    assert (summary["completed"], summary["failed"], summary["goodput"]) == (6, 0, pytest.approx(
        6 / summary["duration_s"]))
    expected = synthetic_workload(6, LengthDistribution.uniform(4, 12), LengthDistribution.uniform(2, 8),
                                  Vocabulary(VOCAB, (EOS, BOS)), seed=5)
    assert [r["max_tokens"] for r in requests] == [c.turns[0].max_tokens for c in expected.conversations]
    assert [r["prompt_tokens"] for r in requests] == [len(c.turns[0].content) for c in expected.conversations]
    for r in requests:  # ignore_eos: exactly max_tokens each, one streamed message per token
        assert r["status"] == "OK" and r["finish_reason"] == "length"
        assert r["output_tokens"] == r["max_tokens"] and len(r["itl_s"]) == r["max_tokens"] - 1
        assert 0 < r["ttft_s"] <= r["e2e_s"]
    assert summary["total_output_tokens"] == sum(r["max_tokens"] for r in requests)


def test_multiturn_prompts_grow_by_each_reply_on_a_real_server(server: BackgroundServer) -> None:
    workload = multiturn_workload(6, turns=3, system_len=8, input_len=LengthDistribution.uniform(2, 6),
                                  output_len=LengthDistribution.uniform(2, 5), vocab=Vocabulary(VOCAB, (BOS, EOS)))
    result = run_load(Connection(server.target), workload, LoadSpec(ignore_eos=True), progress=False)
    assert [r.status for r in result.records] == ["OK"] * 6
    turns = [t for c in workload.conversations for t in c.turns]
    for i, (r, turn) in enumerate(zip(result.records, turns, strict=True)):
        assert r.output_tokens == turn.max_tokens
        previous = result.records[i - 1] if r.turn else None
        grown = previous.prompt_tokens + previous.output_tokens if previous else 8
        assert r.prompt_tokens == grown + len(turn.content)  # the server counted the whole conversation


def test_rejected_and_unreachable_requests_are_counted_not_raised(server: BackgroundServer) -> None:
    too_long = Workload("w", (Conversation((), (Turn((1,) * 300, 4), Turn((2,), 4))),
                              Conversation((), (Turn((3,), 2),))))
    result = run_load(Connection(server.target), too_long, LoadSpec(ignore_eos=True), progress=False)
    assert [r.status for r in result.records] == ["INVALID_ARGUMENT", SKIPPED, "OK"]
    assert "prompt" in result.records[0].error

    with socket_without_server() as target:
        result = run_load(Connection(target), too_long, LoadSpec(), progress=False)
    assert [r.status for r in result.records] == ["UNAVAILABLE", SKIPPED, "UNAVAILABLE"]


@contextlib.contextmanager
def socket_without_server() -> Iterator[str]:
    """A 127.0.0.1 port held bound but not listening, so connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"
