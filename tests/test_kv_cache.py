"""Tests of jaxserve/kv/cache.py: prefix hits on the device, host and disk tiers, eviction, swap-out, corruption,
restart, and a randomized run checking that pages are conserved and every cached token's KV is the right one.

The device pool is a numpy stand-in: "computing" token t at position i writes t * 1000 + i into its slot, so a
page mapped to the wrong tokens, or copied wrongly between tiers, shows up as a wrong value.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from jaxserve.kv.cache import KVCache
from jaxserve.kv.pages import PageAllocator
from jaxserve.kv.tiers import ArrayPayload, DiskTier, HostTier
from jaxserve.sequence import Sequence

PS = 4  # page size


class NumpyPool:
    """The runner's page mover over a numpy pool [num_pages, PS]."""

    def __init__(self, num_pages: int) -> None:
        self.data = np.full((num_pages, PS), -1.0)
        self.reads = self.writes = 0

    def read_pages(self, pages: list[int]) -> list[ArrayPayload]:
        self.reads += len(pages)
        return [ArrayPayload(self.data[p].copy()) for p in pages]

    def write_pages(self, pages: list[int], payloads: list[ArrayPayload]) -> None:
        self.writes += len(pages)
        for p, payload in zip(pages, payloads, strict=True):
            self.data[p] = payload.numpy()


def compute(cache: KVCache, pool: NumpyPool, seq: Sequence, num: int | None = None) -> None:
    """Stands in for a prefill chunk: writes the KV of the next `num` uncomputed tokens (default all)."""
    start = seq.num_computed_tokens
    num = seq.num_uncomputed if num is None else num
    tokens = seq.token_ids
    for pos in range(start, start + num):
        pool.data[seq.block_table[pos // PS], pos % PS] = tokens[pos] * 1000 + pos
    seq.num_computed_tokens += num
    cache.commit(seq, start)
    cache.publish()


def assert_kv(pool: NumpyPool, seq: Sequence) -> None:
    """Every computed token's slot holds that token's KV."""
    tokens = seq.token_ids
    for pos in range(seq.num_computed_tokens):
        got = pool.data[seq.block_table[pos // PS], pos % PS]
        assert got == tokens[pos] * 1000 + pos, f"{seq.request_id}: position {pos} holds {got}"


def make(num_pages: int = 32, host_pages: int = 0, disk: Path | None = None, disk_pages: int = 64,
         salt: bytes = b"s") -> tuple[KVCache, NumpyPool]:
    pool = NumpyPool(num_pages)
    disk_tier = DiskTier(disk, disk_pages * PS * 8, (PS,), np.float64) if disk is not None else None
    host = None
    if host_pages or disk_tier is not None:
        host = HostTier(host_pages * PS * 8, PS * 8, spill=disk_tier.put if disk_tier is not None else None)
    cache = KVCache(PageAllocator(num_pages, PS), salt=salt, host=host, disk=disk_tier,
                    mover=pool if host is not None else None, page_bytes=PS * 8)
    return cache, pool


def seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(rid, tokens)


def run_to_end(cache: KVCache, pool: NumpyPool, s: Sequence) -> None:
    assert cache.admit(s)
    assert_kv(pool, s)
    compute(cache, pool, s)
    assert_kv(pool, s)


def test_same_prefix_shares_device_pages_and_counts_device_hits():
    cache, pool = make()
    a = seq("a", list(range(10, 23)))  # 13 tokens: 3 full pages
    run_to_end(cache, pool, a)
    b = seq("b", list(range(10, 19)) + [99, 98, 97])  # shares 2 full pages (8 tokens) + 1 token
    assert cache.admit(b)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.num_computed_tokens == 8 and b.cached_tokens == {"device": 8, "host": 0, "disk": 0}
    assert cache.allocator.refcount(a.block_table[0]) == 2
    compute(cache, pool, b)
    assert_kv(pool, a)
    assert_kv(pool, b)
    cache.check_invariants()


def test_an_identical_prompt_leaves_its_last_token_to_compute():
    cache, pool = make()
    run_to_end(cache, pool, seq("a", list(range(12))))  # exactly 3 pages
    b = seq("b", list(range(12)))
    assert cache.admit(b)
    assert b.num_computed_tokens == 8 and b.num_uncomputed == 4  # the third page holds the last token: recomputed


def test_finished_pages_stay_cached_until_allocation_needs_them():
    cache, pool = make(num_pages=9)  # 8 usable pages
    a = seq("a", list(range(16)))
    run_to_end(cache, pool, a)
    a_pages = a.block_table
    cache.release(a)
    assert cache.allocator.num_cached_free == 4 and cache.num_cached_pages == 4
    filler = seq("f", [7] * 16)  # plain free pages go first: the cached prefix survives
    run_to_end(cache, pool, filler)
    assert cache.num_cached_pages == 8
    cache.release(filler)
    big = seq("g", [5] * 8)  # 2 pages, both cached ones: a's (released earlier), its tail first
    run_to_end(cache, pool, big)
    assert cache.admit(b := seq("b", list(range(16)) + [1]))
    assert b.num_computed_tokens == 8 and b.block_table[:2] == a_pages[:2]
    assert_kv(pool, b)
    cache.check_invariants()


def test_evicted_pages_go_to_host_and_come_back_with_the_same_kv():
    cache, pool = make(num_pages=9, host_pages=16)
    a = seq("a", list(range(100, 114)))  # 3 full pages and a partial one
    run_to_end(cache, pool, a)
    cache.release(a)
    x = seq("x", [3] * 32)  # needs all 8 pages: a's 3 indexed pages are evicted to the host
    run_to_end(cache, pool, x)
    assert len(cache.host) == 3 and pool.reads == 3
    cache.release(x)
    b = seq("b", list(range(100, 114)) + [5])
    assert cache.admit(b)
    assert b.cached_tokens == {"device": 0, "host": 12, "disk": 0} and b.num_computed_tokens == 12
    assert pool.writes == 3
    assert_kv(pool, b)
    compute(cache, pool, b)
    assert_kv(pool, b)
    cache.check_invariants()


def test_a_page_a_lower_tier_holds_is_not_copied_down_again():
    cache, pool = make(num_pages=9, host_pages=16)
    run_to_end(cache, pool, a := seq("a", list(range(9))))
    cache.release(a)
    cache.evict_device()
    assert pool.reads == 2
    run_to_end(cache, pool, b := seq("b", list(range(9))))  # host hit: copied back up
    cache.release(b)
    cache.evict_device()
    assert pool.reads == 2 and len(cache.host) == 2


def test_host_overflow_spills_to_disk_and_a_disk_hit_restores_the_kv(tmp_path: Path):
    cache, pool = make(host_pages=2, disk=tmp_path)
    a = seq("a", list(range(50, 67)))  # 4 full pages
    run_to_end(cache, pool, a)
    cache.release(a)
    cache.evict_device()  # 4 pages to a 2-page host: the 2 least recent spill to disk
    assert len(cache.host) == 2 and len(cache.disk) == 2
    cache.spill_host()
    assert len(cache.host) == 0 and len(cache.disk) == 4
    b = seq("b", list(range(50, 67)) + [1])
    cache.prefetch(b)
    assert cache.admit(b)
    assert b.cached_tokens == {"device": 0, "host": 0, "disk": 16}
    assert_kv(pool, b)
    cache.check_invariants()
    cache.close()


def test_a_corrupt_disk_page_ends_the_hit_there(tmp_path: Path):
    cache, pool = make(disk=tmp_path)
    run_to_end(cache, pool, a := seq("a", list(range(17))))
    cache.release(a)
    cache.close()  # persists every cached page to disk
    assert len(list(tmp_path.glob("*.kvpage"))) == 4
    cache, pool = make(disk=tmp_path)
    third = tmp_path / (a.page_keys[2].hex() + ".kvpage")
    raw = bytearray(third.read_bytes())
    raw[-3] ^= 0x40
    third.write_bytes(bytes(raw))
    b = seq("b", list(range(17)) + [1])
    assert cache.admit(b)
    assert b.cached_tokens["disk"] == 8 and b.num_computed_tokens == 8  # pages 0, 1; page 2 is bad, 3 follows it
    assert_kv(pool, b)
    compute(cache, pool, b)
    assert_kv(pool, b)
    assert not third.exists()
    cache.close(persist=False)


def test_a_restart_reuses_the_disk_only_under_the_same_salt(tmp_path: Path):
    cache, pool = make(disk=tmp_path)
    run_to_end(cache, pool, a := seq("a", list(range(13))))
    cache.release(a)
    cache.close()
    other, _ = make(disk=tmp_path, salt=b"another model")
    assert other.admit(c := seq("c", list(range(13))))
    assert c.num_computed_tokens == 0
    other.close(persist=False)
    again, pool = make(disk=tmp_path)
    assert again.admit(b := seq("b", list(range(13))))
    assert b.cached_tokens["disk"] == 12
    assert_kv(pool, b)
    again.close(persist=False)


def test_swap_out_keeps_every_computed_token_including_the_partial_page():
    cache, pool = make(num_pages=9, host_pages=16)
    s = seq("s", list(range(30, 40)))
    run_to_end(cache, pool, s)
    s.append_token(77)
    s.append_token(78)  # 12 tokens, 11 computed: 2 full pages and 3 tokens of the third
    assert cache.grow(s, s.num_tokens)
    compute(cache, pool, s, 1)
    assert s.num_computed_tokens == 11
    cache.swap_out(s)
    s.num_computed_tokens = 0
    s.num_preemptions = 1
    x = seq("x", [9] * 32)  # takes every page: the swapped sequence's full pages are evicted to the host
    run_to_end(cache, pool, x)
    cache.release(x)
    assert cache.admit(s)
    assert s.num_computed_tokens == 11 and s.num_uncomputed == 1
    assert_kv(pool, s)
    cache.check_invariants()


def test_without_prefix_caching_nothing_is_reused():
    pool = NumpyPool(16)
    cache = KVCache(PageAllocator(16, PS), prefix_caching=False)
    run_to_end(cache, pool, a := seq("a", list(range(9))))
    cache.release(a)
    assert cache.allocator.num_cached_free == 0
    assert cache.admit(b := seq("b", list(range(9))))
    assert b.num_computed_tokens == 0 and b.cached_tokens == {"device": 0, "host": 0, "disk": 0}


def test_admission_short_of_pages_changes_nothing():
    cache, pool = make(num_pages=5, host_pages=8)
    run_to_end(cache, pool, seq("a", list(range(9))))  # 3 of 4 pages
    before = (cache.allocator.num_free, cache.num_cached_pages, len(cache.host))
    assert not cache.admit(b := seq("b", list(range(8)) + [5] * 6))  # shares 2 pages, needs 2 more; 1 is free
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert (cache.allocator.num_free, cache.num_cached_pages, len(cache.host)) == before
    cache.check_invariants()


def test_a_failed_copy_in_drops_those_pages_and_admission_retries_without_them():
    cache, pool = make(num_pages=9, host_pages=16)
    run_to_end(cache, pool, a := seq("a", list(range(9))))
    cache.release(a)
    cache.evict_device()

    def broken(pages, payloads):
        raise RuntimeError("device lost")

    pool.write_pages = broken
    b = seq("b", list(range(9)))
    assert not cache.admit(b)
    assert len(cache.host) == 0 and cache.allocator.num_used == 0
    assert cache.admit(b) and b.num_computed_tokens == 0
    cache.check_invariants()


def test_pages_are_conserved_and_kv_stays_right_under_random_operations(tmp_path: Path):
    rng = random.Random(0)
    cache, pool = make(num_pages=24, host_pages=10, disk=tmp_path, disk_pages=30)
    prefixes = [[rng.randrange(1000) for _ in range(rng.randrange(3, 20))] for _ in range(4)]
    live: list[Sequence] = []
    paused: list[Sequence] = []
    hits = 0
    for i in range(600):
        op = rng.random()
        if op < 0.3 and len(live) < 6:
            s = paused.pop(0) if paused and rng.random() < 0.5 else seq(
                f"r{i}", rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randrange(1, 10))])
            if cache.admit(s):
                hits += s.num_computed_tokens > 0
                assert_kv(pool, s)
                live.append(s)
            elif s.num_preemptions:
                paused.append(s)
        elif op < 0.65 and live:
            s = rng.choice(live)
            if s.num_uncomputed == 0:
                s.append_token(rng.randrange(1000))
                if not cache.grow(s, s.num_tokens):
                    continue
            compute(cache, pool, s, rng.randint(1, s.num_uncomputed))
            assert_kv(pool, s)
        elif op < 0.75 and live:
            s = live.pop(rng.randrange(len(live)))
            if rng.random() < 0.5:
                cache.swap_out(s)
            else:
                cache.release(s)
            s.num_computed_tokens = 0
            s.num_preemptions += 1
            paused.append(s)
        elif op < 0.9 and live:
            cache.release(live.pop(rng.randrange(len(live))))
        elif op < 0.95:
            cache.evict_device()
        else:
            cache.spill_host()
        cache.check_invariants()
    for s in live:
        cache.release(s)
    assert cache.allocator.num_used == 0
    assert hits > 20
    cache.close(persist=False)


def test_settle_takes_landed_copies_into_host_memory_without_waiting_for_the_rest():
    class Copying:
        def __init__(self, value: float) -> None:
            self.ready, self.reads, self.value = False, 0, value

        def is_ready(self) -> bool:
            return self.ready

        def numpy(self) -> np.ndarray:
            self.reads += 1
            return np.full(PS, self.value)

    cache, pool = make(num_pages=9, host_pages=16)
    copies: list[Copying] = []
    pool.read_pages = lambda pages: copies.extend(Copying(p) for p in pages) or copies[-len(pages):]
    run_to_end(cache, pool, a := seq("a", list(range(9))))
    cache.release(a)
    cache.evict_device()
    assert len(copies) == 2
    cache.settle()
    assert [c.reads for c in copies] == [0, 0]
    copies[1].ready = True
    cache.settle()
    assert [c.reads for c in copies] == [0, 1]
    copies[0].ready = True
    cache.settle()
    cache.settle()
    assert [c.reads for c in copies] == [1, 1]
