"""The two KV tiers below the device: host DRAM (`HostTier`) and local disk (`DiskTier`), each an LRU store of whole
pages keyed by the prefix index's 16-byte page keys.

Pure Python and numpy, no JAX: page bytes arrive and leave as `PagePayload`s, whose `numpy()` waits for a device copy.
Which pages go down or come back up is the prefix index's business (`jaxserve/kv/cache.py`); here is only storage.

Disk format, one file per page named `<key hex>.kvpage`: a header (magic b"JSKVPG01", the 16-byte key, the payload
length as little-endian u64, the payload's zlib.crc32 as u32) and then the raw page bytes. A file's mtime records its
recency, so a restart on the same directory keeps the LRU order without reading any page.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import numpy as np
from absl import logging

PageKey = bytes  # 16-byte content hash of one page

MAGIC = b"JSKVPG01"
HEADER = struct.Struct("<8s16sQI")  # magic, key, payload length, crc32 of the payload
SUFFIX = ".kvpage"
TEMP_SUFFIX = SUFFIX + ".tmp"
_READ_THREADS = 4


class PagePayload(Protocol):
    """One page's KV on its way to or from the host: `numpy()` blocks until the bytes are on the host."""

    def numpy(self) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class ArrayPayload:
    """A payload already in host memory."""

    array: np.ndarray

    def numpy(self) -> np.ndarray:
        """The page itself; nothing to wait for."""
        return self.array


@dataclasses.dataclass
class TierStats:
    """Plain counters, read by the engine for metrics."""

    puts: int = 0  # pages stored
    hits: int = 0  # get() that returned data
    misses: int = 0  # get() that returned None
    evictions: int = 0  # pages pushed out for capacity (host: spilled or dropped; disk: deleted)
    bytes_written: int = 0  # host: pages put * page_bytes; disk: bytes written to files
    bytes_read: int = 0  # bytes returned by get()
    corrupt: int = 0  # disk only: files that failed verification or could not be read


class HostTier:
    """Pages in host DRAM, LRU-ordered, capped at `capacity_bytes`. Engine-thread only (not thread-safe)."""

    def __init__(self, capacity_bytes: int, page_bytes: int,
                 spill: Callable[[PageKey, PagePayload], None] | None = None) -> None:
        if page_bytes <= 0 or capacity_bytes < 0:
            raise ValueError(f"page_bytes must be > 0 and capacity_bytes >= 0, got {page_bytes} and {capacity_bytes}")
        self.page_bytes = page_bytes
        self.capacity_pages = capacity_bytes // page_bytes
        self.stats = TierStats()
        self._spill = spill
        self._pages: collections.OrderedDict[PageKey, PagePayload] = collections.OrderedDict()  # oldest first

    def __contains__(self, key: PageKey) -> bool:
        return key in self._pages

    def __len__(self) -> int:
        return len(self._pages)

    @property
    def used_bytes(self) -> int:
        """Bytes held, counted in whole pages."""
        return len(self._pages) * self.page_bytes

    def get(self, key: PageKey) -> PagePayload | None:
        """The page, marked most recently used; None if the tier does not hold it."""
        payload = self._pages.get(key)
        if payload is None:
            self.stats.misses += 1
            return None
        self._pages.move_to_end(key)
        self.stats.hits += 1
        self.stats.bytes_read += self.page_bytes
        return payload

    def put(self, key: PageKey, payload: PagePayload) -> None:
        """Stores the page as the most recent; least recently used pages beyond capacity go to `spill`."""
        self._pages[key] = payload
        self._pages.move_to_end(key)
        self.stats.puts += 1
        self.stats.bytes_written += self.page_bytes
        while len(self._pages) > self.capacity_pages:
            old_key, old = self._pages.popitem(last=False)
            self.stats.evictions += 1
            if self._spill is not None:
                self._spill(old_key, old)

    def pop(self, key: PageKey) -> PagePayload | None:
        """Removes the page without spilling it (it moved back to the device)."""
        return self._pages.pop(key, None)

    def spill_all(self) -> None:
        """Hands every page to `spill`, oldest first, and empties the tier (shutdown, tests, benchmarks)."""
        pages, self._pages = self._pages, collections.OrderedDict()
        if self._spill is not None:
            for key, payload in pages.items():
                self._spill(key, payload)

    def keys(self) -> list[PageKey]:
        """The keys held, least recently used first."""
        return list(self._pages)


class _CorruptPage(Exception):
    """A page file that fails verification."""


@dataclasses.dataclass(eq=False)
class _Entry:
    """One indexed page. `payload` is set while its file is still being written; `mtime_ns` is the recency the file
    should carry. Identity matters: a background job finishing for an entry that was dropped (and maybe put again
    under the same key) must not touch the new one."""

    mtime_ns: int
    payload: PagePayload | None = None


class DiskTier:
    """Pages as files in one directory, capped at `capacity_bytes`; writes are asynchronous, reads verify a checksum.

    The engine thread calls every method; one writer thread (so `flush` can wait behind the queue) and a few reader
    threads (prefetch) run in the background. `_lock` guards the index and every rename or delete of a page file, so
    a late writer never resurrects a page that was dropped meanwhile.
    """

    def __init__(self, path: str | os.PathLike, capacity_bytes: int, page_shape: tuple[int, ...],
                 dtype: np.dtype | str, *, max_prefetch_bytes: int = 1 << 30) -> None:
        self.path = Path(path)
        self.page_shape = tuple(page_shape)
        self.dtype = np.dtype(dtype)
        self.page_bytes = math.prod(self.page_shape) * self.dtype.itemsize
        if self.page_bytes <= 0 or capacity_bytes < 0:
            raise ValueError(f"page_shape {page_shape} must be non-empty and capacity_bytes >= 0, got {capacity_bytes}")
        self.capacity_pages = capacity_bytes // self.page_bytes
        self.stats = TierStats()
        self._lock = threading.Lock()
        self._index: collections.OrderedDict[PageKey, _Entry] = collections.OrderedDict()  # oldest first
        # Unclaimed prefetches (e.g. of a request cancelled before admission) are capped, oldest dropped first.
        self._max_prefetch = max(1, min(self.capacity_pages, max_prefetch_bytes // self.page_bytes))
        self._reads: collections.OrderedDict[PageKey, concurrent.futures.Future[np.ndarray]] = collections.OrderedDict()
        self._last_mtime_ns = 0
        self._closed = False
        self.path.mkdir(parents=True, exist_ok=True)
        self._scan()
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kv-disk-write")
        self._reader = concurrent.futures.ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="kv-disk-read")

    def __contains__(self, key: PageKey) -> bool:
        with self._lock:
            return key in self._index

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    @property
    def used_bytes(self) -> int:
        """Payload bytes indexed (written or being written), in whole pages; headers are not counted."""
        return len(self) * self.page_bytes

    def put(self, key: PageKey, payload: PagePayload) -> None:
        """Indexes the page at once and queues its write; least recently used pages beyond capacity are deleted."""
        if self._closed:
            raise RuntimeError(f"put on the closed disk tier at {self.path}")
        with self._lock:
            if key in self._index:  # a key names its content, so the page is already stored (or on its way)
                self._touch(key, self._index[key])
                return
            entry = self._index[key] = _Entry(self._next_mtime(), payload)
            self.stats.puts += 1
            while len(self._index) > self.capacity_pages:
                self._drop(next(iter(self._index)))
                self.stats.evictions += 1
            if key in self._index:
                self._writer.submit(self._write, key, entry)

    def get(self, key: PageKey) -> np.ndarray | None:
        """The page [*page_shape], marked most recently used; None when it is absent or fails verification."""
        with self._lock:
            entry = self._index.get(key)
            pending = entry.payload if entry is not None else None
            read = self._reads.pop(key, None)
        if entry is None:
            self.stats.misses += 1
            return None
        try:
            if pending is not None:
                array = self._host_array(pending)
            elif read is not None:
                array = read.result()  # waits for a read in flight rather than reading twice
            else:
                array = self._read_file(key)
        except Exception as e:  # bad data is a miss (the page is recomputed), never an error
            with self._lock:
                if self._index.get(key) is entry:
                    self._drop(key)
                    if isinstance(e, (_CorruptPage, OSError)) and not isinstance(e, FileNotFoundError):
                        self.stats.corrupt += 1
            logging.warning("dropping KV page %s from the disk tier: %s", key.hex(), e)
            self.stats.misses += 1
            return None
        with self._lock:
            if self._index.get(key) is entry:
                self._touch(key, entry)
            self.stats.hits += 1
            self.stats.bytes_read += self.page_bytes
        return array

    def prefetch(self, keys: Iterable[PageKey]) -> None:
        """Starts reading these pages' files in the background, so a later get() finds them in memory."""
        if self._closed:
            return
        with self._lock:
            for key in keys:
                entry = self._index.get(key)
                if entry is None or entry.payload is not None or key in self._reads:
                    continue
                self._reads[key] = self._reader.submit(self._read_file, key)
                while len(self._reads) > self._max_prefetch:
                    self._reads.popitem(last=False)[1].cancel()

    def discard(self, key: PageKey) -> None:
        """Forgets the page and deletes its file, if any."""
        with self._lock:
            if key in self._index:
                self._drop(key)

    def flush(self) -> None:
        """Blocks until every write queued so far is on disk (or has failed and been dropped)."""
        if not self._closed:
            self._writer.submit(lambda: None).result()  # one writer thread: this runs after every earlier write

    def close(self) -> None:
        """Flushes, then stops the background threads. Idempotent; pages on disk stay for the next start."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._writer.shutdown()
        self._reader.shutdown(cancel_futures=True)
        with self._lock:
            self._reads.clear()

    # ----- internals -----

    def _file(self, key: PageKey) -> Path:
        return self.path / (key.hex() + SUFFIX)

    def _next_mtime(self) -> int:
        """A strictly increasing clock for file mtimes: the kernel's coarse timestamps could tie within a step."""
        self._last_mtime_ns = max(time.time_ns(), self._last_mtime_ns + 1)
        return self._last_mtime_ns

    def _touch(self, key: PageKey, entry: _Entry) -> None:
        """Marks the page most recently used, in the index and (once written) in its file's mtime. Holds `_lock`."""
        self._index.move_to_end(key)
        entry.mtime_ns = self._next_mtime()
        if entry.payload is None:
            try:
                os.utime(self._file(key), ns=(entry.mtime_ns, entry.mtime_ns))
            except OSError:
                pass  # a vanished file shows up as a miss at the next get()

    def _drop(self, key: PageKey) -> None:
        """Removes the page from the index, its pending prefetch and the disk. Holds `_lock`."""
        del self._index[key]
        read = self._reads.pop(key, None)
        if read is not None:
            read.cancel()
        self._file(key).unlink(missing_ok=True)

    def _host_array(self, payload: PagePayload) -> np.ndarray:
        """The payload's page, checked: a mismatched one would be written as a file that can never verify."""
        array = np.ascontiguousarray(payload.numpy())
        if array.dtype != self.dtype or array.nbytes != self.page_bytes:
            raise ValueError(f"payload is {array.dtype}{list(array.shape)}, the tier stores "
                             f"{self.dtype}{list(self.page_shape)}")
        return array.reshape(self.page_shape)

    def _write(self, key: PageKey, entry: _Entry) -> None:
        """Writer thread: the page to a temp file, renamed into place only if the entry is still indexed. No fsync:
        a page torn by a power cut fails the size or checksum check later and is only recomputed."""
        with self._lock:
            payload = entry.payload if self._index.get(key) is entry else None
        if payload is None:  # dropped while queued
            return
        tmp = self.path / (key.hex() + TEMP_SUFFIX)
        try:
            data = self._host_array(payload).reshape(-1).view(np.uint8)
            with open(tmp, "wb") as f:
                f.write(HEADER.pack(MAGIC, key, data.nbytes, zlib.crc32(data)))
                f.write(data)
            with self._lock:
                if self._index.get(key) is entry:
                    os.replace(tmp, self._file(key))
                    os.utime(self._file(key), ns=(entry.mtime_ns, entry.mtime_ns))
                    entry.payload = None
                    self.stats.bytes_written += HEADER.size + data.nbytes
        except Exception:  # a failed write costs one page's recompute; the writer thread must live on
            logging.exception("writing KV page %s to %s failed; the page is dropped", key.hex(), self.path)
            with self._lock:
                if self._index.get(key) is entry:
                    self._drop(key)
        finally:
            tmp.unlink(missing_ok=True)

    def _read_file(self, key: PageKey) -> np.ndarray:
        """Reads and verifies a page file; raises OSError or _CorruptPage. Safe on any thread (touches no state)."""
        size = HEADER.size + self.page_bytes
        buf = bytearray(size)  # the array returned owns this buffer: nothing else ever writes into it
        with open(self._file(key), "rb") as f:
            got = f.readinto(buf)
            extra = f.read(1)
        if got != size or extra:
            raise _CorruptPage(f"file is not {size} bytes")
        magic, file_key, length, crc = HEADER.unpack_from(buf)
        payload = memoryview(buf)[HEADER.size:]
        if magic != MAGIC:
            raise _CorruptPage(f"bad magic {magic!r}")
        if file_key != key:
            raise _CorruptPage(f"header names key {file_key.hex()}")
        if length != self.page_bytes:
            raise _CorruptPage(f"header length {length}, expected {self.page_bytes}")
        if zlib.crc32(payload) != crc:
            raise _CorruptPage("checksum mismatch")
        return np.frombuffer(buf, self.dtype, offset=HEADER.size).reshape(self.page_shape)

    def _scan(self) -> None:
        """Indexes the page files a previous run left, oldest mtime first, without reading them."""
        size = HEADER.size + self.page_bytes
        found: list[tuple[int, PageKey]] = []
        for p in self.path.iterdir():
            if p.name.endswith(TEMP_SUFFIX):  # a write cut short by a crash
                p.unlink(missing_ok=True)
                continue
            stem = p.name.removesuffix(SUFFIX)
            if p.name == stem or len(stem) != 32 or stem.strip("0123456789abcdef"):
                continue
            st = p.stat()
            if st.st_size != size:
                logging.warning("dropping KV page file %s: %d bytes, expected %d", p, st.st_size, size)
                p.unlink(missing_ok=True)
                self.stats.corrupt += 1
                continue
            found.append((st.st_mtime_ns, bytes.fromhex(stem)))
        found.sort()
        excess = max(0, len(found) - self.capacity_pages)  # a smaller capacity than last run: oldest go
        for _, key in found[:excess]:
            self._file(key).unlink(missing_ok=True)
            self.stats.evictions += 1
        for mtime_ns, key in found[excess:]:
            self._index[key] = _Entry(mtime_ns)
        self._last_mtime_ns = max((m for m, _ in found), default=0)
