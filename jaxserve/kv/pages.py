"""Page bookkeeping for the device KV pool: a refcounted page allocator and the block-table / slot arithmetic.

Host-side only (Python and numpy, no JAX); the pool's arrays belong to the runner. The pool holds `num_pages` pages
of `page_size` token slots; slot = page * page_size + offset. Page 0 is the reserved trash page that padding rows
write into, so it is never handed out.

Free pages sit in one of two lists, each in the order the pages were released. A page freed with reusable content
(a prefix the index still points at) goes to the cached list, any other to the plain list. Allocation takes plain
pages first and only then the least recently released cached page, so cached prefixes survive as long as possible;
the prefix index can `reclaim` a cached page before allocation reaches it.
"""

from __future__ import annotations

import collections
from collections.abc import Container, Iterable, Sequence

import numpy as np

TRASH_PAGE = 0


class PageError(ValueError):
    """A page operation that breaks the allocator's invariants (unknown page, reserved page)."""


class OutOfPagesError(PageError):
    """More pages were asked for than are free."""


class DoubleFreeError(PageError):
    """A page was freed more times than it was allocated or shared."""


class PageAllocator:
    """Hands out pages 1..num_pages-1 and counts references to each, so sequences can share a page.

    Invariant: num_free + num_used == num_usable == num_pages - 1; a page is free exactly when its refcount is 0,
    and a free page is in exactly one of the plain and cached lists.
    """

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 2:
            raise ValueError(f"num_pages: must be >= 2 (page 0 is reserved), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size: must be >= 1, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._refcounts = [0] * num_pages
        # Ordered sets: allocation pops from the front, release appends at the back.
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(1, num_pages))
        self._cached: collections.OrderedDict[int, None] = collections.OrderedDict()

    @property
    def num_usable(self) -> int:
        """Pages that can ever be handed out (all but the trash page)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        """Pages with no reference (plain or cached)."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached_free(self) -> int:
        """Free pages whose content is still reusable."""
        return len(self._cached)

    @property
    def num_used(self) -> int:
        """Pages referenced by at least one holder."""
        return self.num_usable - self.num_free

    def is_cached_free(self, page: int) -> bool:
        """Whether `page` is free but keeps reusable content."""
        return page in self._cached

    def cached_free_pages(self) -> list[int]:
        """The cached free pages, least recently released first."""
        return list(self._cached)

    def refcount(self, page: int) -> int:
        """How many holders reference `page`."""
        self._check_page(page)
        return self._refcounts[page]

    def can_allocate(self, num: int) -> bool:
        """Whether `num` pages are free right now."""
        return 0 <= num <= self.num_free

    def allocate(self, num: int) -> list[int]:
        """Takes `num` free pages (refcount 1 each), plain ones first; raises OutOfPagesError, taking none, if fewer
        are free. The caller must check which of them were cached (`is_cached_free` before, or its own index)."""
        if num < 0:
            raise ValueError(f"num: must be >= 0, got {num}")
        if num > self.num_free:
            raise OutOfPagesError(f"asked for {num} pages, {self.num_free} of {self.num_usable} are free")
        pages = [(self._free if self._free else self._cached).popitem(last=False)[0] for _ in range(num)]
        for p in pages:
            self._refcounts[p] = 1
        return pages

    def reclaim(self, page: int) -> None:
        """Adds a reference to a page that is in use or cached free (a prefix hit); a plain free page is refused."""
        self._check_page(page)
        if self._refcounts[page] == 0:
            if page not in self._cached:
                raise PageError(f"page {page} is free and holds nothing reusable")
            del self._cached[page]
        self._refcounts[page] += 1

    def uncache(self, page: int) -> None:
        """Moves a cached free page to the plain list: its content is no longer wanted."""
        if page not in self._cached:
            raise PageError(f"page {page} is not a cached free page")
        del self._cached[page]
        self._free[page] = None

    def share(self, pages: Iterable[int]) -> None:
        """Adds a reference to each (already allocated) page, for a second holder of the same KV."""
        pages = list(pages)
        for p in pages:
            self._check_page(p)
            if self._refcounts[p] == 0:
                raise PageError(f"page {p} is free; only allocated pages can be shared")
        for p in pages:
            self._refcounts[p] += 1

    def free(self, pages: Iterable[int], cached: Container[int] = ()) -> list[int]:
        """Drops one reference per listed page; returns the pages that reached refcount 0 and are free again.

        Released pages listed in `cached` keep reusable content and go to the cached list. All-or-nothing: a page
        freed more often than it is referenced raises DoubleFreeError and nothing changes.
        """
        drops = collections.Counter(pages)
        for p, n in drops.items():
            self._check_page(p)
            if n > self._refcounts[p]:
                raise DoubleFreeError(f"page {p} freed {n} time(s) but has {self._refcounts[p]} reference(s)")
        released = []
        for p, n in drops.items():
            self._refcounts[p] -= n
            if self._refcounts[p] == 0:
                (self._cached if p in cached else self._free)[p] = None
                released.append(p)
        return released

    def _check_page(self, page: int) -> None:
        if page == TRASH_PAGE:
            raise PageError("page 0 is the reserved trash page")
        if not 0 < page < self.num_pages:
            raise PageError(f"page {page} is outside [1, {self.num_pages})")


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages needed to hold `num_tokens` tokens."""
    return -(-num_tokens // page_size)


def slots_for(block_table: Sequence[int], start: int, count: int, page_size: int) -> np.ndarray:
    """Flat pool slots [count] int32 of tokens start..start+count-1 of a sequence with this block table."""
    if start < 0 or count < 0:
        raise ValueError(f"start and count must be >= 0, got start={start} count={count}")
    if start + count > len(block_table) * page_size:
        raise ValueError(f"tokens up to {start + count} need {pages_for(start + count, page_size)} pages, "
                         f"the block table holds {len(block_table)}")
    positions = np.arange(start, start + count, dtype=np.int32)
    pages = np.asarray(block_table, dtype=np.int32)[positions // page_size]
    return pages * page_size + positions % page_size


def block_table_array(tables: Sequence[Sequence[int]], width: int) -> np.ndarray:
    """Block tables stacked into [len(tables), width] int32, padded with the trash page 0."""
    out = np.full((len(tables), width), TRASH_PAGE, dtype=np.int32)
    for i, table in enumerate(tables):
        if len(table) > width:
            raise ValueError(f"row {i}: block table of {len(table)} pages exceeds the width {width}")
        out[i, : len(table)] = table
    return out
