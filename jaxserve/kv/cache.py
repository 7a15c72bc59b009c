"""The block manager: which device pages each sequence holds, which pages hold a reusable prefix, and where evicted
prefix pages live now (host DRAM, then local disk).

No JAX here: page contents move through a `PageMover` the runner provides (`read_pages` starts an asynchronous copy
of device pages out, `write_pages` copies payloads into device pages). Every call is made while the scheduler plans,
so it is dispatched before the step the plan feeds, and the device sees copies and steps in program order.

Prefix index. Full pages are keyed by a hash chain: key(i) = blake2b(key(i-1) + tokens of page i) and key(-1) is a
digest of the salt (model, weights, layout, dtype, page size, a user salt), so a key names a page's content and
everything before it. The device index maps keys to pages. A page whose last holder leaves stays indexed on the
allocator's cached list, least recently released first, until allocation needs it; then it is evicted: dropped from
the index and, unless a lower tier holds it already, copied down to the host tier, which spills its own least
recently used pages to disk. A lookup walks the chain until the first key no tier holds; pages found on the host or
disk are copied into fresh device pages, and only the rest of the sequence is prefilled.

Swap preemption keeps a preempted sequence's full pages cached like any other and copies its last, partial page to
the host under a key of its own tokens, so when it is admitted again the lookup finds every token it had computed.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence as TokenList
from typing import Protocol

import numpy as np
from absl import logging

from jaxserve.kv.pages import PageAllocator, pages_for
from jaxserve.kv.tiers import ArrayPayload, DiskTier, HostTier, PagePayload, TierStats
from jaxserve.metrics import Metrics
from jaxserve.sequence import Sequence

TIERS = ("device", "host", "disk")


class CopyingPage(PagePayload, Protocol):
    """A page on its way out of the device."""

    def is_ready(self) -> bool:
        """Whether its bytes have reached the host (numpy() would not wait)."""


class PageMover(Protocol):
    """Copies whole pages between the device KV pool and host memory (the runner implements it)."""

    def read_pages(self, pages: list[int]) -> list[CopyingPage]:
        """Starts copying `pages` out of the pool; each payload's numpy() waits for its data."""

    def write_pages(self, pages: list[int], payloads: list[PagePayload]) -> None:
        """Copies one payload into each of `pages`, before any later step reads them."""


def chain_key(parent: bytes, tokens: TokenList[int]) -> bytes:
    """Key of a full page: its tokens chained to the key of the page before it."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.asarray(tokens, np.int64).tobytes())
    return h.digest()


def partial_key(parent: bytes, tokens: TokenList[int]) -> bytes:
    """Key of a partly filled page (swap preemption); never equal to a full page's key."""
    return chain_key(parent + b"partial", tokens)


@dataclasses.dataclass(frozen=True)
class _Hit:
    key: bytes
    tier: str
    page: int  # the device page for a device hit
    num_tokens: int  # page_size, or fewer for a partial page


class KVCache:
    """Device pages of sequences plus the prefix index and the host and disk tiers. Engine-thread only."""

    def __init__(self, allocator: PageAllocator, *, prefix_caching: bool = True, salt: bytes = b"",
                 host: HostTier | None = None, disk: DiskTier | None = None, mover: PageMover | None = None,
                 page_bytes: int = 0, metrics: Metrics | None = None) -> None:
        if disk is not None and host is None:
            raise ValueError("a disk tier needs a host tier in front of it (capacity 0 passes pages straight down)")
        if host is not None and (mover is None or not prefix_caching):
            raise ValueError("host and disk tiers need prefix caching and a page mover")
        self.allocator = allocator
        self.page_size = allocator.page_size
        self.prefix_caching = prefix_caching
        self.host, self.disk, self.mover = host, disk, mover
        self.page_bytes = page_bytes
        self.metrics = metrics
        self._root = hashlib.blake2b(salt, digest_size=16).digest()
        self._index: dict[bytes, int] = {}  # key -> device page
        self._page_key: dict[int, bytes] = {}  # device page -> key
        self._pending: list[tuple[bytes, int]] = []  # filled by the step being planned; indexed by publish()
        self._copying: list[CopyingPage] = []  # read out of the device, not yet landed in host memory
        self._reported: dict[str, TierStats] = {}

    # ----- holding pages -----

    @property
    def num_cached_pages(self) -> int:
        """Device pages indexed by the prefix cache (held or cached free)."""
        return len(self._index)

    def admit(self, seq: Sequence) -> bool:
        """Gives a sequence without pages its block table: the longest cached prefix (device pages shared, host and
        disk pages copied in) and fresh pages for its other tokens; `num_computed_tokens` becomes the cached count.

        At least the newest token is left uncached so the step that computes it samples the next one. Returns
        False, changing nothing, when the pool is short of pages.
        """
        if seq.block_table:
            raise ValueError(f"request {seq.request_id!r} already holds pages")
        num_pages = pages_for(seq.num_tokens, self.page_size)
        hits = self._lookup(seq)
        if not self._fits(hits, num_pages):
            return False
        hits, payloads = self._fetch(hits)
        if not self._fits(hits, num_pages):
            return False
        for h in hits:
            if h.tier == "device":
                self.allocator.reclaim(h.page)
        fresh = iter(self._allocate(num_pages - sum(h.tier == "device" for h in hits)))
        seq.block_table = [h.page if h.tier == "device" else next(fresh) for h in hits]
        loaded = [(h, p) for h, p in zip(hits, seq.block_table, strict=True) if h.tier != "device"]
        seq.block_table += list(fresh)
        if loaded and not self._write([p for _, p in loaded], payloads):
            # Forget the pages that failed to load so the next attempt prefills them instead.
            for h, _ in loaded:
                self.host.pop(h.key)  # type: ignore[union-attr]
                if self.disk is not None:
                    self.disk.discard(h.key)
            self.release(seq)
            return False
        for h, p in loaded:
            if h.num_tokens == self.page_size:
                self._index[h.key], self._page_key[p] = p, h.key
        seq.num_computed_tokens = sum(h.num_tokens for h in hits)
        if seq.num_preemptions == 0:
            seq.cached_tokens = {t: sum(h.num_tokens for h in hits if h.tier == t) for t in TIERS}
            if self.metrics is not None and self.prefix_caching:
                self.metrics.prefix_cache_queried_tokens.inc(seq.num_tokens - 1)
                for t, n in seq.cached_tokens.items():
                    self.metrics.prefix_cache_hit_tokens.labels(t).inc(n)
        if self.metrics is not None:
            for h, _ in loaded:
                self.metrics.kv_onloaded_bytes.labels(h.tier).inc(self.page_bytes)
        return True

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Extends the block table to hold `num_tokens` tokens; False, allocating nothing, if pages are short."""
        need = pages_for(num_tokens, self.page_size) - len(seq.block_table)
        if need <= 0:
            return True
        if not self.allocator.can_allocate(need):
            return False
        seq.block_table.extend(self._allocate(need))
        return True

    def commit(self, seq: Sequence, start: int) -> None:
        """Notes the pages a planned chunk fills (tokens start..num_computed_tokens-1); `publish` indexes them.

        Not at once: a sequence admitted later in the same plan could hit a page this step has yet to write, and
        its own chunk may run first (decode rows run before prefill chunks).
        """
        if not self.prefix_caching:
            return
        # A page holding a token still being sampled (asynchronous scheduling) has no key yet: the engine commits
        # it again once the token is known.
        end = min(seq.num_computed_tokens, seq.num_known_tokens, len(seq.block_table) * self.page_size)
        first, last = start // self.page_size, end // self.page_size
        if last > first:
            keys = self._keys(seq, last)
            self._pending += [(keys[i], seq.block_table[i]) for i in range(first, last)]

    def finish_copies(self) -> None:
        """Waits until every page copied out of the device has landed in host memory."""
        for page in self._copying:
            page.numpy()
        self._copying = []

    def settle(self) -> None:
        """Takes into host memory the pages whose copies out of the device have landed, so device buffers are freed
        soon after each copy instead of when the page is next used (call it once a step; it never waits)."""
        copying = []
        for page in self._copying:
            if page.is_ready():
                page.numpy()
            else:
                copying.append(page)
        self._copying = copying

    def publish(self) -> None:
        """Indexes the pages the step just dispatched fills, for reuse by later steps (call it before any page of
        the step is released)."""
        for key, page in self._pending:
            if key not in self._index and page not in self._page_key:
                self._index[key], self._page_key[page] = page, key
        self._pending.clear()

    def release(self, seq: Sequence) -> None:
        """Drops the sequence's pages; indexed ones stay cached, the tail released first so it is evicted first."""
        table = seq.block_table
        self.allocator.free(reversed(table), cached={p for p in table if p in self._page_key})
        seq.block_table = []

    @property
    def can_swap(self) -> bool:
        """Whether preempted sequences can keep their KV (a host tier exists to take their partial pages)."""
        return self.host is not None

    def swap_out(self, seq: Sequence) -> None:
        """Releases a preempted sequence's pages keeping its KV reusable: full pages stay cached (evicted pages go
        down the tiers), the partial last page is copied to the host now."""
        computed = seq.num_computed_tokens
        num_full, tail = divmod(computed, self.page_size)
        if tail and self.host is not None:
            keys = self._keys(seq, num_full)
            key = partial_key(keys[-1] if keys else self._root,
                              seq.token_ids[num_full * self.page_size: computed])
            if key not in self.host:
                payloads = self._read([seq.block_table[num_full]])
                if payloads:
                    self.host.put(key, payloads[0])
        self.release(seq)

    def prefetch(self, seq: Sequence) -> None:
        """Starts reading from disk the cached prefix pages of a newly queued sequence, ahead of its admission."""
        if self.disk is None:
            return
        on_disk = []
        for key in self._keys(seq, (seq.num_tokens - 1) // self.page_size):
            if key in self._index or key in self.host:  # type: ignore[operator]
                continue
            if key not in self.disk:
                break
            on_disk.append(key)
        if on_disk:
            self.disk.prefetch(on_disk)

    # ----- forcing pages down (tests, benchmarks, shutdown) -----

    def evict_device(self) -> None:
        """Evicts every cached free device page (copied down to the host tier when there is one)."""
        pages = self.allocator.cached_free_pages()
        for p in pages:
            self.allocator.uncache(p)
        self._evict(pages)

    def spill_host(self) -> None:
        """Moves every host page down to disk (dropped without a disk tier) and waits for the writes."""
        if self.host is not None:
            self.host.spill_all()
        if self.disk is not None:
            self.disk.flush()

    def reset_device(self) -> None:
        """Forgets every device page's cached content (after a failed step, whose KV cannot be trusted)."""
        for p in self.allocator.cached_free_pages():
            self.allocator.uncache(p)
        self._index.clear()
        self._page_key.clear()
        self._pending.clear()

    def close(self, persist: bool = True) -> None:
        """With `persist` and a disk tier, moves every cached page down to disk so a restart reuses it; then
        waits for the writes and stops the disk threads."""
        if self.disk is None:
            return
        if persist:
            self.evict_device()
            self.spill_host()
        self.disk.close()

    def check_invariants(self) -> None:
        """Raises AssertionError when pages are not conserved (tests call it after every step)."""
        a = self.allocator
        assert a.num_free + a.num_used == a.num_usable, "free + used != usable"
        assert len(self._index) == len(self._page_key), "index and page keys disagree"
        for key, page in self._index.items():
            assert self._page_key.get(page) == key, f"page {page} indexed under two keys"
            assert a.refcount(page) > 0 or a.is_cached_free(page), f"indexed page {page} is plain free"
        for page in a.cached_free_pages():
            assert page in self._page_key, f"cached free page {page} is not indexed"
        for tier in (self.host, self.disk):
            if tier is not None:
                assert tier.used_bytes <= tier.capacity_pages * tier.page_bytes, "a tier is over capacity"

    def report(self) -> None:
        """Brings the Prometheus metrics up to date with the tiers' counters and sizes."""
        m = self.metrics
        if m is None:
            return
        m.kv_tier_pages.labels("device").set(len(self._index))
        m.kv_tier_bytes.labels("device").set(self.allocator.num_used * self.page_bytes)
        for name, tier in (("host", self.host), ("disk", self.disk)):
            if tier is None:
                continue
            m.kv_tier_pages.labels(name).set(len(tier))
            m.kv_tier_bytes.labels(name).set(tier.used_bytes)
            now, before = dataclasses.replace(tier.stats), self._reported.get(name, TierStats())
            m.kv_offloaded_bytes.labels(name).inc(now.bytes_written - before.bytes_written)
            m.kv_evicted_pages.labels(name).inc(now.evictions - before.evictions)
            m.kv_corrupt_pages.inc(now.corrupt - before.corrupt)
            self._reported[name] = now

    # ----- internals -----

    def _keys(self, seq: Sequence, num_pages: int) -> list[bytes]:
        """The chain keys of the sequence's first `num_pages` full pages (extends `seq.page_keys` as needed)."""
        keys, ps = seq.page_keys, self.page_size
        if len(keys) < num_pages:
            tokens = seq.token_ids
            parent = keys[-1] if keys else self._root
            for i in range(len(keys), num_pages):
                parent = chain_key(parent, tokens[i * ps: (i + 1) * ps])
                keys.append(parent)
        return keys[:num_pages]

    def _where(self, key: bytes) -> str | None:
        if key in self._index:
            return "device"
        if self.host is not None and key in self.host:
            return "host"
        if self.disk is not None and key in self.disk:
            return "disk"
        return None

    def _lookup(self, seq: Sequence) -> list[_Hit]:
        """The cached pages at the head of the sequence, in order, up to the first miss."""
        if not self.prefix_caching:
            return []
        ps, limit = self.page_size, seq.num_tokens - 1
        num_full = limit // ps
        keys = self._keys(seq, num_full)
        hits = []
        for key in keys:
            tier = self._where(key)
            if tier is None:
                break
            hits.append(_Hit(key, tier, self._index.get(key, 0), ps))
        tail = limit - num_full * ps
        if len(hits) == num_full and tail and self.host is not None:
            tokens, parent = seq.token_ids[num_full * ps: limit], keys[-1] if keys else self._root
            for n in range(tail, 0, -1):
                key = partial_key(parent, tokens[:n])
                tier = self._where(key)
                if tier is not None:
                    hits.append(_Hit(key, tier, 0, n))
                    break
        return hits

    def _fits(self, hits: list[_Hit], num_pages: int) -> bool:
        """Whether the free pages cover the cached device hits to reclaim plus the fresh pages."""
        device = [h.page for h in hits if h.tier == "device"]
        reclaimed = sum(self.allocator.is_cached_free(p) for p in device)
        return self.allocator.can_allocate(reclaimed + num_pages - len(device))

    def _fetch(self, hits: list[_Hit]) -> tuple[list[_Hit], list[PagePayload]]:
        """The payloads of host and disk hits; a disk page that fails verification ends the hits there."""
        payloads: list[PagePayload] = []
        for i, h in enumerate(hits):
            if h.tier == "host":
                payloads.append(self.host.get(h.key))  # type: ignore[arg-type, union-attr]
            elif h.tier == "disk":
                array = self.disk.get(h.key)  # type: ignore[union-attr]
                if array is None:
                    return hits[:i], payloads
                payloads.append(ArrayPayload(array))
        return hits, payloads

    def _allocate(self, num: int) -> list[int]:
        """Fresh pages; cached ones among them are evicted first."""
        pages = self.allocator.allocate(num)
        evicted = [p for p in pages if p in self._page_key]
        if evicted:
            self._evict(evicted)
        return pages

    def _evict(self, pages: list[int]) -> None:
        """Drops pages from the device index, copying down the ones no lower tier holds yet."""
        keys = [self._page_key.pop(p) for p in pages]
        for key in keys:
            del self._index[key]
        if self.metrics is not None and pages:
            self.metrics.kv_evicted_pages.labels("device").inc(len(pages))
        if self.host is None:
            return
        down = [(p, k) for p, k in zip(pages, keys, strict=True)
                if k not in self.host and (self.disk is None or k not in self.disk)]
        payloads = self._read([p for p, _ in down])
        for (_, key), payload in zip(down, payloads, strict=False):
            self.host.put(key, payload)

    def _read(self, pages: list[int]) -> list[CopyingPage]:
        if not pages:
            return []
        try:
            payloads = self.mover.read_pages(pages)  # type: ignore[union-attr]
        except Exception:  # a lost copy only costs a recompute later
            logging.exception("copying %d KV pages out of the device failed; they are dropped", len(pages))
            return []
        self._copying += payloads
        return payloads

    def _write(self, pages: list[int], payloads: list[PagePayload]) -> bool:
        try:
            self.mover.write_pages(pages, payloads)  # type: ignore[union-attr]
            return True
        except Exception:  # the pages are then recomputed
            logging.exception("copying %d KV pages into the device failed; they are recomputed", len(pages))
            return False
