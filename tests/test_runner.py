"""The runner on the tiny model: every mesh agrees, chunked prefill is exact, tokens fed on the device equal the same
tokens from the host, nothing compiles after warm-up."""

import numpy as np
import pytest
from engine_harness import Collector, started_engine

from jaxserve.config import load_config
from jaxserve.engine import Request
from jaxserve.generate import GenerationOptions, generate
from jaxserve.runner import Feed, Runner, StepBatch, page_buckets
from jaxserve.sampling import Sampled
from jaxserve.sequence import SamplingOptions

PROMPTS = [[256, 72, 101, 108, 108, 111], [256, *range(40, 77)], [256, 9, 9, 9]]


def _runner(*overrides: str) -> Runner:
    return Runner(load_config("configs/tiny.toml", ["runner.warmup=false", *overrides]))


@pytest.fixture(scope="module")
def reference_output() -> list[list[int]]:
    return generate(_runner(), PROMPTS, [GenerationOptions(max_tokens=8)] * len(PROMPTS))


MESHES = [(t, p) for t in (1, 2, 4, 8) for p in (1, 2, 4) if t * p <= 8 and (t, p) != (1, 1)]


@pytest.mark.parametrize(("tensor", "pipeline"), MESHES)
def test_greedy_output_is_the_same_on_every_mesh(reference_output, tensor: int, pipeline: int) -> None:
    runner = _runner(f"mesh.tensor={tensor}", f"mesh.pipeline={pipeline}")
    assert generate(runner, PROMPTS, [GenerationOptions(max_tokens=8)] * len(PROMPTS)) == reference_output


def _prefill_batch(tokens: np.ndarray, start: int, table: np.ndarray, page_size: int) -> StepBatch:
    pos = np.arange(start, start + len(tokens), dtype=np.int32)
    slots = table[pos // page_size] * page_size + pos % page_size
    one = (np.zeros(1, np.float32), np.zeros(1, np.int32), np.ones(1, np.float32), np.zeros(1, np.uint32))
    return StepBatch(tokens[None].astype(np.int32), pos[None], slots[None].astype(np.int32), table[None],
                     np.array([len(tokens) - 1], np.int32), *one)


@pytest.mark.parametrize("pipeline", [1, 2])
def test_chunked_prefill_equals_one_shot_prefill(pipeline: int) -> None:
    runner = _runner(f"mesh.pipeline={pipeline}")
    ps = runner.config.cache.page_size
    prompt = np.random.RandomState(1).randint(0, 256, 50)
    table = np.array([7, 3, 12, 5, 9, 21, 30], np.int32)  # scattered pages on purpose
    whole = runner.logits(_prefill_batch(prompt, 0, table, ps))[0]
    runner.reset_cache()
    parts = [runner.logits(_prefill_batch(prompt[s:s + 16], s, table, ps))[0] for s in range(0, 50, 16)]
    np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-5)


@pytest.mark.parametrize(("tensor", "pipeline"), [(1, 1), (2, 2), (8, 1)])
def test_pages_copied_out_and_back_into_other_pages_give_the_same_logits(tensor: int, pipeline: int) -> None:
    runner = _runner(f"mesh.tensor={tensor}", f"mesh.pipeline={pipeline}")
    ps = runner.config.cache.page_size
    prompt = np.random.RandomState(2).randint(0, 256, 40)
    source, target = np.array([3, 9, 4, 11, 6, 2], np.int32), np.array([20, 21, 30, 22, 25, 26], np.int32)
    runner.logits(_prefill_batch(prompt, 0, source, ps))  # 40 tokens: 5 full pages
    payloads = runner.read_pages(source[:5].tolist())
    want = runner.logits(_prefill_batch(np.array([7, 8]), 40, source, ps))
    runner.write_pages(source[:5].tolist(), [payloads[0]] * 5)  # clobber the source after the copy out
    runner.write_pages(target[:5].tolist(), payloads)
    got = runner.logits(_prefill_batch(np.array([7, 8]), 40, target, ps))
    np.testing.assert_array_equal(got, want)
    assert payloads[1].numpy().shape == runner.page_shape and len(payloads) == 5


def test_decode_reads_only_a_bucket_of_pages() -> None:
    assert page_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert page_buckets(20) == (1, 2, 4, 8, 16, 20)
    assert page_buckets(1) == (1,)


def test_compile_count_stays_flat_after_warmup() -> None:
    runner = Runner(load_config("configs/tiny.toml", ["runner.max_seq_len=96"]))
    runner.warmup()
    warm = runner.compile_count
    steps = len(runner.page_buckets) * (len(runner.decode_buckets) + len(runner.prefill_buckets))
    feeds = len(runner.decode_buckets) ** 2  # decode tokens fed from one decode bucket to another
    assert warm == steps + feeds + 2 * len(runner.copy_buckets)  # page copies out of and into the pool, per bucket
    rng = np.random.RandomState(0)
    for _ in range(50):
        rows = rng.randint(1, 9)
        prompts = [list(rng.randint(0, 256, rng.randint(1, 70))) for _ in range(rows)]
        options = [GenerationOptions(max_tokens=int(rng.randint(1, 96 - len(p) + 1)), temperature=float(rng.rand()),
                                     seed=int(rng.randint(1000))) for p in prompts]
        generate(runner, prompts, options)
        assert runner.compile_count == warm
    # The engine's asynchronous steps (decode batches that grow and shrink, fed on the device) compile nothing more.
    engine, got = started_engine(runner, "runner.max_seq_len=96"), Collector()
    for i in range(50):
        prompt = list(rng.randint(0, 256, rng.randint(1, 70)))
        engine.submit(Request(str(i), prompt, SamplingOptions(max_tokens=int(rng.randint(1, 96 - len(prompt) + 1)),
                                                              ignore_eos=True)), got.sink)
    got.wait(50)
    assert engine.shutdown(5)
    assert runner.compile_count == warm


def test_same_seed_gives_same_sample_whatever_the_batch() -> None:
    runner = _runner()
    opts = GenerationOptions(max_tokens=12, temperature=1.0, top_k=20, seed=7)
    alone = generate(runner, [PROMPTS[0]], [opts])[0]
    together = generate(runner, PROMPTS, [opts, GenerationOptions(max_tokens=5, temperature=0.5, seed=1),
                                          GenerationOptions(max_tokens=3)])[0]
    assert alone == together
    assert generate(runner, [PROMPTS[0]], [GenerationOptions(max_tokens=12, temperature=1.0, seed=8)])[0] != alone


def test_padding_ids_past_sampled_vocab_size_are_never_sampled() -> None:
    runner = Runner(load_config("configs/tiny.toml", ["runner.warmup=false", "model.sampled_vocab_size=10"]))
    opts = [GenerationOptions(max_tokens=20, temperature=2.0, seed=s) for s in range(4)]
    for out in generate(runner, [PROMPTS[0]] * 4, opts):
        assert max(out) < 10


def _step_batch(runner: Runner, rows: list[tuple[int, list[int], int]], temperature: float = 0.0) -> StepBatch:
    """Rows of (sequence index, its tokens, first position); sequence i holds pages 1 + 8i ... 8 + 8i."""
    ps, n = runner.config.cache.page_size, max(len(t) for _, t, _ in rows)
    table = np.array([[1 + 8 * i + j for j in range(8)] for i, _, _ in rows], np.int32)
    positions = np.full((len(rows), n), -1, np.int32)
    tokens = np.zeros((len(rows), n), np.int32)
    for r, (_, t, start) in enumerate(rows):
        positions[r, : len(t)] = np.arange(start, start + len(t))
        tokens[r, : len(t)] = t
    slots = np.where(positions >= 0, table[np.arange(len(rows))[:, None], positions // ps] * ps + positions % ps, 0)
    b = len(rows)
    return StepBatch(tokens, positions, slots.astype(np.int32), table, np.array([len(t) - 1 for _, t, _ in rows]),
                     np.full(b, temperature, np.float32), np.zeros(b, np.int32), np.ones(b, np.float32),
                     np.arange(b, dtype=np.uint32))


def _same(a: Sampled, b: Sampled, rows: int) -> None:
    """The same ids and logprobs in the first `rows` rows."""
    np.testing.assert_array_equal(np.asarray(a.token)[:rows], np.asarray(b.token)[:rows])
    np.testing.assert_array_equal(np.asarray(a.logprob)[:rows], np.asarray(b.logprob)[:rows])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_decode_tokens_fed_on_the_device_equal_the_same_tokens_given_by_the_host(temperature: float) -> None:
    runner = _runner()
    first = [runner.prefill(_step_batch(runner, [(i, p, 0)], temperature)) for i, p in enumerate(PROMPTS)]
    ids = [int(np.asarray(out.token)[0]) for out in first]
    at = [len(p) for p in PROMPTS]

    def decode(tokens: list[int], seqs: list[int], feed: Feed | None = None) -> Sampled:
        rows = [(i, [t], at[i]) for i, t in zip(seqs, tokens, strict=True)]
        return runner.decode(_step_batch(runner, rows, temperature), feed)

    # From prefill outputs (gathered into row order first), after the previous decode bucket's ids: 4 here.
    base = runner.decode_buckets[0]
    host = decode(ids, [0, 1, 2])
    fed = decode([0, 0, 0], [0, 1, 2], Feed(None, np.array([base, base + 1, base + 2], np.int32),
                                            tuple(out.token for out in first)))
    _same(host, fed, 3)
    at = [a + 1 for a in at]
    ids = [int(t) for t in np.asarray(host.token)[:3]]
    # The steady state (the previous decode's ids in the same bucket, taken as they are), one row from the host.
    host2 = decode([ids[0], 9, ids[2]], [0, 1, 2])
    fed2 = decode([0, 9, 0], [0, 1, 2], Feed(fed.token, np.array([0, -1, 2], np.int32)))
    _same(host2, fed2, 3)
    at = [a + 1 for a in at]
    ids = [int(t) for t in np.asarray(host2.token)[:3]]
    # Rows reordered, and a previous bucket (4 rows) other than this one's (8 rows: 5 here).
    # Sequences 3 and 4 start here, from the host.
    at += [0, 0]
    seqs = [2, 0, 1, 3, 4]
    host3 = decode([ids[2], ids[0], ids[1], 5, 6], seqs)
    fed3 = decode([0, 0, 0, 5, 6], seqs, Feed(fed2.token, np.array([2, 0, 1, -1, -1], np.int32)))
    _same(host3, fed3, 5)
