"""Tests for jaxserve/kv/pages.py: the refcounted page allocator and the block-table / slot arithmetic."""

import random

import numpy as np
import pytest

from jaxserve.kv.pages import (
    DoubleFreeError,
    OutOfPagesError,
    PageAllocator,
    PageError,
    block_table_array,
    pages_for,
    slots_for,
)


def test_page_zero_is_never_handed_out():
    alloc = PageAllocator(num_pages=6, page_size=4)
    assert (alloc.num_free, alloc.num_used, alloc.num_usable) == (5, 0, 5)
    pages = alloc.allocate(5)
    assert sorted(pages) == [1, 2, 3, 4, 5]
    assert alloc.num_free == 0 and not alloc.can_allocate(1)


def test_allocating_more_than_free_raises_and_takes_nothing():
    alloc = PageAllocator(num_pages=4, page_size=2)
    alloc.allocate(2)
    with pytest.raises(OutOfPagesError, match="asked for 2 pages, 1 of 3 are free"):
        alloc.allocate(2)
    assert alloc.num_free == 1
    assert alloc.can_allocate(1) and alloc.can_allocate(0) and not alloc.can_allocate(2)


def test_double_free_raises_and_changes_nothing():
    alloc = PageAllocator(num_pages=5, page_size=2)
    a, b = alloc.allocate(2)
    alloc.free([a])
    with pytest.raises(DoubleFreeError, match=f"page {a} freed 1 time"):
        alloc.free([b, a])
    assert alloc.refcount(b) == 1  # all-or-nothing: b was not released either
    with pytest.raises(DoubleFreeError):
        alloc.free([b, b])
    assert alloc.refcount(b) == 1 and alloc.num_used == 1


def test_reserved_and_unknown_pages_are_refused():
    alloc = PageAllocator(num_pages=4, page_size=2)
    with pytest.raises(PageError, match="reserved trash page"):
        alloc.free([0])
    with pytest.raises(PageError, match="outside"):
        alloc.free([4])
    with pytest.raises(PageError, match="is free"):
        alloc.share([1])
    with pytest.raises(ValueError, match="num_pages"):
        PageAllocator(num_pages=1, page_size=2)
    with pytest.raises(ValueError, match="page_size"):
        PageAllocator(num_pages=4, page_size=0)


def test_shared_page_is_released_at_its_last_reference():
    alloc = PageAllocator(num_pages=4, page_size=2)
    (p,) = alloc.allocate(1)
    alloc.share([p])
    assert alloc.refcount(p) == 2
    assert alloc.free([p]) == []
    assert alloc.num_used == 1
    assert alloc.free([p]) == [p]
    assert alloc.num_used == 0 and alloc.refcount(p) == 0


def test_released_pages_are_reused_oldest_release_first():
    alloc = PageAllocator(num_pages=5, page_size=2)
    pages = alloc.allocate(4)
    alloc.free([pages[2]])
    alloc.free([pages[0]])
    assert alloc.allocate(2) == [pages[2], pages[0]]


def test_free_plus_used_stays_usable_under_random_operations():
    rng = random.Random(0)
    alloc = PageAllocator(num_pages=33, page_size=4)
    held: list[int] = []  # one entry per reference
    for _ in range(2000):
        op = rng.random()
        if op < 0.4:
            n = rng.randint(0, 6)
            if alloc.can_allocate(n):
                new = alloc.allocate(n)
                assert not set(new) & set(held), "a held page was handed out again"
                held += new
            else:
                with pytest.raises(OutOfPagesError):
                    alloc.allocate(n)
        elif op < 0.55 and held:
            p = rng.choice(held)
            alloc.share([p])
            held.append(p)
        elif held:
            drop = rng.sample(held, rng.randint(1, min(4, len(held))))
            for p in drop:
                held.remove(p)
            released = alloc.free(drop)
            assert all(p not in held for p in released)
        assert alloc.num_free + alloc.num_used == alloc.num_usable == 32
        assert alloc.num_used == len(set(held))
        assert all(alloc.refcount(p) == held.count(p) for p in set(held))
    alloc.free(held)
    assert alloc.num_free == 32


def test_pages_for_rounds_up():
    assert [pages_for(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_slots_for_maps_positions_through_the_block_table():
    slots = slots_for([5, 2, 9], start=3, count=6, page_size=4)
    assert slots.dtype == np.int32
    assert slots.tolist() == [5 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1, 2 * 4 + 2, 2 * 4 + 3, 9 * 4 + 0]
    assert slots_for([7], start=0, count=0, page_size=4).shape == (0,)


def test_slots_beyond_the_block_table_raise():
    with pytest.raises(ValueError, match="need 3 pages, the block table holds 2"):
        slots_for([1, 2], start=6, count=3, page_size=4)
    with pytest.raises(ValueError, match="must be >= 0"):
        slots_for([1], start=-1, count=1, page_size=4)


def test_block_table_array_pads_with_the_trash_page():
    out = block_table_array([[3, 4], [], [7]], width=3)
    assert out.dtype == np.int32
    assert out.tolist() == [[3, 4, 0], [0, 0, 0], [7, 0, 0]]
    with pytest.raises(ValueError, match="row 0: block table of 2 pages exceeds the width 1"):
        block_table_array([[1, 2]], width=1)
