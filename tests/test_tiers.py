"""Tests for jaxserve/kv/tiers.py: the host LRU tier, and the disk tier's round trip, capacity, restart, corruption
handling, prefetch and write failures."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from jaxserve.kv.tiers import HEADER, ArrayPayload, DiskTier, HostTier, PageKey, PagePayload

SHAPE = (2, 3, 4)
PAGE_BYTES = 2 * 3 * 4 * 4  # float32


def key(i: int) -> PageKey:
    return i.to_bytes(16, "little")


def page(i: int, dtype: np.dtype | str = np.float32) -> np.ndarray:
    return (np.arange(np.prod(SHAPE)).reshape(SHAPE) + 100 * i).astype(dtype)


def disk(path: Path, pages: int = 8, dtype: np.dtype | str = np.float32) -> DiskTier:
    return DiskTier(path, pages * int(np.prod(SHAPE)) * np.dtype(dtype).itemsize, SHAPE, dtype)


def file_of(path: Path, i: int) -> Path:
    return path / (key(i).hex() + ".kvpage")


class Spilled:
    """A spill target that records what it was handed."""

    def __init__(self) -> None:
        self.pages: list[tuple[PageKey, PagePayload]] = []

    def __call__(self, k: PageKey, payload: PagePayload) -> None:
        self.pages.append((k, payload))

    def keys(self) -> list[PageKey]:
        return [k for k, _ in self.pages]


class Gate:
    """Page 0 whose bytes reach the host only once the test opens the gate."""

    def __init__(self) -> None:
        self.open = threading.Event()

    def numpy(self) -> np.ndarray:
        assert self.open.wait(timeout=60), "the gate was never opened"
        return page(0)


class FailingPayload:
    """A device copy that fails when the writer waits for it."""

    def numpy(self) -> np.ndarray:
        raise RuntimeError("device copy failed")


# ----- host tier -----


def test_host_capacity_is_whole_pages_and_evicts_least_recent_to_spill():
    spilled = Spilled()
    host = HostTier(3 * 100 + 99, 100, spill=spilled)
    assert host.capacity_pages == 3
    payloads = [ArrayPayload(page(i)) for i in range(4)]
    for i in range(3):
        host.put(key(i), payloads[i])
    assert host.keys() == [key(0), key(1), key(2)] and host.used_bytes == 300 and not spilled.pages
    host.put(key(3), payloads[3])
    assert spilled.keys() == [key(0)] and spilled.pages[0][1] is payloads[0]
    assert host.keys() == [key(1), key(2), key(3)] and len(host) == 3 and host.used_bytes == 300
    assert (host.stats.puts, host.stats.evictions, host.stats.bytes_written) == (4, 1, 400)


def test_host_get_refreshes_recency_and_contains_does_not():
    spilled = Spilled()
    host = HostTier(200, 100, spill=spilled)
    host.put(key(0), ArrayPayload(page(0)))
    host.put(key(1), ArrayPayload(page(1)))
    assert key(0) in host  # no refresh: key 0 stays the oldest
    assert host.keys() == [key(0), key(1)]
    got = host.get(key(0))
    assert got is not None
    np.testing.assert_array_equal(got.numpy(), page(0))
    assert host.keys() == [key(1), key(0)]
    host.put(key(2), ArrayPayload(page(2)))
    assert spilled.keys() == [key(1)]
    assert host.get(key(1)) is None
    assert (host.stats.hits, host.stats.misses, host.stats.bytes_read) == (1, 1, 100)


def test_host_put_of_a_held_key_refreshes_it():
    host = HostTier(200, 100)
    host.put(key(0), ArrayPayload(page(0)))
    host.put(key(1), ArrayPayload(page(1)))
    host.put(key(0), ArrayPayload(page(5)))
    assert host.keys() == [key(1), key(0)] and len(host) == 2
    np.testing.assert_array_equal(host.get(key(0)).numpy(), page(5))


def test_host_without_spill_drops_evicted_pages():
    host = HostTier(100, 100)
    host.put(key(0), ArrayPayload(page(0)))
    host.put(key(1), ArrayPayload(page(1)))
    assert host.keys() == [key(1)] and host.stats.evictions == 1


def test_host_capacity_zero_spills_straight_through():
    spilled = Spilled()
    host = HostTier(99, 100, spill=spilled)
    assert host.capacity_pages == 0
    host.put(key(0), ArrayPayload(page(0)))
    host.put(key(1), ArrayPayload(page(1)))
    assert spilled.keys() == [key(0), key(1)]
    assert len(host) == 0 and host.used_bytes == 0 and key(0) not in host
    assert host.stats.evictions == 2


def test_host_pop_removes_without_spilling():
    spilled = Spilled()
    host = HostTier(300, 100, spill=spilled)
    payload = ArrayPayload(page(0))
    host.put(key(0), payload)
    host.put(key(1), ArrayPayload(page(1)))
    assert host.pop(key(0)) is payload
    assert host.pop(key(0)) is None
    assert host.keys() == [key(1)] and not spilled.pages and host.stats.evictions == 0


def test_host_spill_all_hands_down_every_page_oldest_first():
    spilled = Spilled()
    host = HostTier(300, 100, spill=spilled)
    for i in range(3):
        host.put(key(i), ArrayPayload(page(i)))
    host.get(key(0))
    host.spill_all()
    assert spilled.keys() == [key(1), key(2), key(0)]
    assert len(host) == 0 and host.keys() == []


# ----- disk tier: round trip -----


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.float64])
def test_disk_round_trip_through_the_file(tmp_path: Path, dtype):
    tier = disk(tmp_path, dtype=dtype)
    assert tier.page_bytes == int(np.prod(SHAPE)) * np.dtype(dtype).itemsize
    for i in range(3):
        tier.put(key(i), ArrayPayload(page(i, dtype)))
    tier.flush()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(key(i).hex() + ".kvpage" for i in range(3))
    assert file_of(tmp_path, 1).stat().st_size == HEADER.size + tier.page_bytes
    for i in range(3):
        got = tier.get(key(i))
        assert got is not None and got.dtype == np.dtype(dtype) and got.shape == SHAPE
        np.testing.assert_array_equal(got, page(i, dtype))
    assert tier.stats.hits == 3 and tier.stats.bytes_read == 3 * tier.page_bytes
    assert tier.stats.bytes_written == 3 * (HEADER.size + tier.page_bytes) and tier.stats.puts == 3
    tier.close()


def test_disk_get_returns_a_fresh_writable_array(tmp_path: Path):
    tier = disk(tmp_path)
    tier.put(key(0), ArrayPayload(page(0)))
    tier.flush()
    first = tier.get(key(0))
    first[:] = -1
    np.testing.assert_array_equal(tier.get(key(0)), page(0))
    tier.close()


def test_disk_get_while_the_write_is_pending_returns_the_payload(tmp_path: Path):
    tier = disk(tmp_path)
    gate = Gate()
    tier.put(key(0), gate)  # holds the single writer thread, so the next write stays queued
    tier.put(key(1), ArrayPayload(page(1)))
    assert key(1) in tier and len(tier) == 2
    np.testing.assert_array_equal(tier.get(key(1)), page(1))
    assert not file_of(tmp_path, 1).exists()  # served from memory
    gate.open.set()
    tier.flush()
    assert file_of(tmp_path, 1).exists() and file_of(tmp_path, 0).exists()
    np.testing.assert_array_equal(tier.get(key(0)), page(0))
    np.testing.assert_array_equal(tier.get(key(1)), page(1))
    tier.close()


def test_disk_get_of_an_unknown_key_is_a_miss(tmp_path: Path):
    tier = disk(tmp_path)
    assert tier.get(key(3)) is None and tier.stats.misses == 1
    tier.close()


def test_disk_put_of_a_stored_key_does_not_rewrite(tmp_path: Path):
    tier = disk(tmp_path)
    tier.put(key(0), ArrayPayload(page(0)))
    tier.put(key(1), ArrayPayload(page(1)))
    tier.put(key(0), ArrayPayload(page(0)))
    tier.flush()
    assert tier.stats.puts == 2 and tier.stats.bytes_written == 2 * (HEADER.size + tier.page_bytes)
    assert len(tier) == 2
    tier.close()


class Meddling:
    """A payload that, while the writer waits for its bytes, lets the engine thread's `meddle` run."""

    def __init__(self, meddle) -> None:
        self.meddle = meddle

    def numpy(self) -> np.ndarray:
        self.meddle()
        return page(0)


def test_a_page_discarded_during_its_write_is_not_renamed_into_place(tmp_path: Path):
    tier = disk(tmp_path)
    tier.put(key(0), Meddling(lambda: tier.discard(key(0))))
    tier.flush()
    assert key(0) not in tier and list(tmp_path.iterdir()) == []
    assert tier.stats.bytes_written == 0
    tier.close()


def test_a_page_put_again_during_its_old_write_keeps_the_new_data(tmp_path: Path):
    tier = disk(tmp_path)

    def put_again() -> None:
        tier.discard(key(0))
        tier.put(key(0), ArrayPayload(page(3)))

    tier.put(key(0), Meddling(put_again))
    tier.flush()  # the new write was queued behind this flush's marker, so one more
    tier.flush()
    np.testing.assert_array_equal(tier.get(key(0)), page(3))
    assert [p.name for p in tmp_path.iterdir()] == [file_of(tmp_path, 0).name]
    tier.close()


# ----- disk tier: capacity -----


def test_disk_capacity_deletes_the_least_recently_used_files(tmp_path: Path):
    tier = disk(tmp_path, pages=3)
    assert tier.capacity_pages == 3
    for i in range(3):
        tier.put(key(i), ArrayPayload(page(i)))
    tier.flush()
    assert tier.get(key(0)) is not None  # key 1 is now the least recent
    for i in (3, 4):
        tier.put(key(i), ArrayPayload(page(i)))
        assert tier.used_bytes <= tier.capacity_pages * tier.page_bytes
    tier.flush()
    assert key(1) not in tier and key(2) not in tier and len(tier) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(file_of(tmp_path, i).name for i in (0, 3, 4))
    assert tier.stats.evictions == 2
    for i in (0, 3, 4):
        np.testing.assert_array_equal(tier.get(key(i)), page(i))
    tier.close()


def test_disk_capacity_zero_stores_nothing(tmp_path: Path):
    tier = DiskTier(tmp_path, PAGE_BYTES - 1, SHAPE, np.float32)
    tier.put(key(0), ArrayPayload(page(0)))
    tier.flush()
    assert len(tier) == 0 and tier.get(key(0)) is None and list(tmp_path.iterdir()) == []
    assert tier.stats.evictions == 1
    tier.close()


def test_disk_discard_deletes_the_file_and_tolerates_absent_keys(tmp_path: Path):
    tier = disk(tmp_path)
    gate = Gate()
    tier.put(key(5), gate)  # holds the writer, so key 1's write is still queued when it is discarded
    tier.put(key(0), ArrayPayload(page(0)))
    tier.put(key(1), ArrayPayload(page(1)))
    tier.discard(key(1))
    tier.discard(key(5))
    gate.open.set()
    tier.flush()
    assert sorted(p.name for p in tmp_path.iterdir()) == [file_of(tmp_path, 0).name]
    tier.discard(key(0))
    tier.discard(key(9))
    assert len(tier) == 0 and list(tmp_path.iterdir()) == []
    tier.close()


# ----- disk tier: restart -----


def test_a_restarted_disk_tier_serves_the_same_pages_in_the_same_lru_order(tmp_path: Path):
    first = disk(tmp_path, pages=4)
    for i in range(4):
        first.put(key(i), ArrayPayload(page(i)))
    first.flush()
    first.get(key(0))  # recency now 1, 2, 3, 0
    first.close()
    first.close()  # idempotent

    (tmp_path / "notes.txt").write_text("not a page")
    second = disk(tmp_path, pages=4)
    assert len(second) == 4 and all(key(i) in second for i in range(4))
    second.put(key(4), ArrayPayload(page(4)))  # evicts the least recent: key 1
    second.flush()
    assert key(1) not in second and not file_of(tmp_path, 1).exists()
    for i in (0, 2, 3, 4):
        np.testing.assert_array_equal(second.get(key(i)), page(i))
    assert (tmp_path / "notes.txt").exists()
    second.close()


def test_a_restart_with_less_capacity_keeps_the_newest_files(tmp_path: Path):
    first = disk(tmp_path, pages=4)
    for i in range(4):
        first.put(key(i), ArrayPayload(page(i)))
    first.close()
    second = disk(tmp_path, pages=2)
    assert len(second) == 2 and key(2) in second and key(3) in second
    assert not file_of(tmp_path, 0).exists() and not file_of(tmp_path, 1).exists()
    assert second.stats.evictions == 2
    second.close()


def test_a_restart_drops_wrong_size_files_and_leftover_temp_files(tmp_path: Path):
    first = disk(tmp_path)
    first.put(key(0), ArrayPayload(page(0)))
    first.put(key(1), ArrayPayload(page(1)))
    first.close()
    short = file_of(tmp_path, 1)
    short.write_bytes(short.read_bytes()[:-1])
    temp = tmp_path / (key(2).hex() + ".kvpage.tmp")
    temp.write_bytes(b"half a page")
    second = disk(tmp_path)
    assert len(second) == 1 and key(1) not in second and second.stats.corrupt == 1
    assert not short.exists() and not temp.exists()
    np.testing.assert_array_equal(second.get(key(0)), page(0))
    second.close()


# ----- disk tier: corruption -----


def written(tmp_path: Path, pages: int = 3) -> DiskTier:
    tier = disk(tmp_path)
    for i in range(pages):
        tier.put(key(i), ArrayPayload(page(i)))
    tier.flush()
    return tier


def test_a_flipped_payload_byte_is_a_miss_that_deletes_the_file(tmp_path: Path):
    tier = written(tmp_path)
    path = file_of(tmp_path, 1)
    raw = bytearray(path.read_bytes())
    raw[HEADER.size + 5] ^= 0x01
    path.write_bytes(bytes(raw))
    assert tier.get(key(1)) is None
    assert tier.stats.corrupt == 1 and tier.stats.misses == 1 and tier.stats.hits == 0
    assert key(1) not in tier and not path.exists() and len(tier) == 2
    tier.put(key(1), ArrayPayload(page(1)))
    tier.flush()
    np.testing.assert_array_equal(tier.get(key(1)), page(1))
    np.testing.assert_array_equal(tier.get(key(0)), page(0))
    tier.close()


def test_a_corrupt_file_is_a_miss_however_it_is_broken(tmp_path: Path):
    tier = written(tmp_path, pages=5)
    truncated, bad_magic, bad_length = file_of(tmp_path, 0), file_of(tmp_path, 1), file_of(tmp_path, 2)
    truncated.write_bytes(truncated.read_bytes()[:-7])  # behind the tier's back, after indexing
    too_long = file_of(tmp_path, 3)
    too_long.write_bytes(too_long.read_bytes() + b"\0")
    raw = bytearray(bad_magic.read_bytes())
    raw[0:8] = b"NOTAPAGE"
    bad_magic.write_bytes(bytes(raw))
    raw = bytearray(bad_length.read_bytes())
    raw[24:32] = (PAGE_BYTES - 4).to_bytes(8, "little")
    bad_length.write_bytes(bytes(raw))
    for i in range(4):
        assert tier.get(key(i)) is None
        assert key(i) not in tier and not file_of(tmp_path, i).exists()
    assert tier.stats.corrupt == 4 and tier.stats.misses == 4 and len(tier) == 1
    np.testing.assert_array_equal(tier.get(key(4)), page(4))
    tier.close()


def test_a_file_under_another_keys_name_is_a_key_mismatch(tmp_path: Path):
    tier = written(tmp_path, pages=2)
    os.replace(file_of(tmp_path, 0), file_of(tmp_path, 1))  # page 1's name now holds page 0's bytes
    assert tier.get(key(1)) is None
    assert tier.stats.corrupt == 1 and not file_of(tmp_path, 1).exists()
    assert tier.get(key(0)) is None  # its file is gone: a miss, not a corrupt page
    assert tier.stats.corrupt == 1 and tier.stats.misses == 2 and len(tier) == 0
    tier.close()


def test_a_file_deleted_behind_the_tiers_back_is_a_miss(tmp_path: Path):
    tier = written(tmp_path, pages=2)
    file_of(tmp_path, 0).unlink()
    assert tier.get(key(0)) is None
    assert key(0) not in tier and tier.stats.misses == 1 and tier.stats.corrupt == 0
    np.testing.assert_array_equal(tier.get(key(1)), page(1))
    tier.close()


# ----- disk tier: prefetch -----


def test_prefetch_then_get_returns_the_pages(tmp_path: Path):
    tier = written(tmp_path, pages=3)
    tier.prefetch([key(0), key(2), key(9)])  # key 9 is unknown: ignored
    for i in (0, 2, 1):
        np.testing.assert_array_equal(tier.get(key(i)), page(i))
    assert tier.get(key(9)) is None
    assert tier.stats.hits == 3 and tier.stats.misses == 1
    tier.close()


def test_prefetch_of_a_corrupt_file_is_a_miss_at_get(tmp_path: Path):
    tier = written(tmp_path, pages=2)
    path = file_of(tmp_path, 1)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    tier.prefetch([key(1), key(0)])
    assert tier.get(key(1)) is None and tier.stats.corrupt == 1 and not path.exists()
    np.testing.assert_array_equal(tier.get(key(0)), page(0))
    tier.close()


def test_unclaimed_prefetches_are_capped(tmp_path: Path):
    tier = DiskTier(tmp_path, 8 * PAGE_BYTES, SHAPE, np.float32, max_prefetch_bytes=2 * PAGE_BYTES)
    for i in range(6):
        tier.put(key(i), ArrayPayload(page(i)))
    tier.flush()
    tier.prefetch([key(i) for i in range(6)])
    assert len(tier._reads) == 2
    for i in range(6):
        np.testing.assert_array_equal(tier.get(key(i)), page(i))
    assert len(tier._reads) == 0
    tier.close()


def test_prefetch_after_discard_and_close_is_harmless(tmp_path: Path):
    tier = written(tmp_path, pages=2)
    tier.prefetch([key(0)])
    tier.discard(key(0))
    assert tier.get(key(0)) is None
    tier.close()
    tier.prefetch([key(1)])
    np.testing.assert_array_equal(tier.get(key(1)), page(1))  # a closed tier still reads synchronously


# ----- disk tier: write failures -----


def test_a_payload_that_fails_in_the_writer_is_dropped(tmp_path: Path):
    tier = disk(tmp_path)
    tier.put(key(0), FailingPayload())
    tier.put(key(1), ArrayPayload(page(1)))
    tier.flush()
    assert key(0) not in tier and len(tier) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [file_of(tmp_path, 1).name]
    tier.put(key(0), ArrayPayload(page(0)))
    tier.flush()
    np.testing.assert_array_equal(tier.get(key(0)), page(0))
    np.testing.assert_array_equal(tier.get(key(1)), page(1))
    tier.close()


def test_a_payload_of_the_wrong_shape_or_dtype_is_dropped(tmp_path: Path):
    tier = disk(tmp_path)
    tier.put(key(0), ArrayPayload(np.zeros(5, np.float32)))
    tier.put(key(1), ArrayPayload(page(1, np.float64)))
    tier.flush()
    assert len(tier) == 0 and list(tmp_path.iterdir()) == []
    tier.close()


def test_a_failing_pending_payload_is_a_miss_at_get(tmp_path: Path):
    tier = disk(tmp_path)
    tier.put(key(0), FailingPayload())
    assert tier.get(key(0)) is None  # whether get or the writer meets the failure first
    tier.flush()
    assert key(0) not in tier and tier.stats.corrupt == 0
    tier.close()


def test_put_after_close_raises(tmp_path: Path):
    tier = disk(tmp_path)
    tier.close()
    with pytest.raises(RuntimeError, match="closed"):
        tier.put(key(0), ArrayPayload(page(0)))
