"""BlockPool: exact page ids, free-queue order, ref counts, salted prefix cache, eviction."""

from __future__ import annotations

import hashlib
from array import array

import pytest

from inferflux.block_pool import BlockPool, hash_page


def alloc(pool: BlockPool, n: int) -> list[int]:
    pages = pool.allocate(n)
    assert pages is not None
    return pages


def _snapshot(pool: BlockPool) -> tuple:
    pages = range(pool.num_pages)
    return (
        pool.free_queue(),
        [pool.ref_count(p) for p in pages],
        [pool.page_hash(p) for p in pages],
        pool.num_cached_pages,
    )


def test_allocate_exact_ids_never_page_zero() -> None:
    pool = BlockPool(num_pages=6, page_size=4)
    assert pool.num_free_pages == 5 and pool.usage == 0.0
    assert pool.free_queue() == [1, 2, 3, 4, 5]
    assert pool.allocate(2) == [1, 2]
    assert pool.allocate(0) == []
    assert pool.allocate(3) == [3, 4, 5]
    assert pool.num_free_pages == 0 and pool.usage == 1.0
    assert [pool.ref_count(p) for p in range(6)] == [0, 1, 1, 1, 1, 1]


def test_allocate_none_leaves_state_unchanged() -> None:
    pool = BlockPool(num_pages=6, page_size=2)
    pages = alloc(pool, 3)
    assert pages == [1, 2, 3]
    pool.cache_pages(pages, pool.hash_pages([1, 2, 3, 4, 5, 6]))
    pool.free(pages)
    before = _snapshot(pool)
    assert pool.allocate(6) is None
    assert _snapshot(pool) == before
    assert pool.get_cached_prefix(pool.hash_pages([1, 2, 3, 4, 5, 6])) == [1, 2, 3]


def test_free_order_hashed_to_tail_reversed_plain_to_head() -> None:
    pool = BlockPool(num_pages=9, page_size=2)
    a = alloc(pool, 3)  # [1, 2, 3]
    b = alloc(pool, 2)  # [4, 5]
    assert (a, b) == ([1, 2, 3], [4, 5])
    # Request a: pages 1 and 2 full and cached, page 3 partial (no hash).
    pool.cache_pages(a[:2], pool.hash_pages([7, 7, 8, 8]))
    pool.free(a)
    # Hashed pages go to the tail, the request's last page first; the plain page to the head.
    assert pool.free_queue() == [3, 6, 7, 8, 2, 1]
    pool.free(b)  # no hashes: to the head, in the request's order
    assert pool.free_queue() == [4, 5, 3, 6, 7, 8, 2, 1]
    assert pool.usage == 0.0
    # Allocation takes plain pages first; cached pages are evicted last, prefix head last of all.
    assert pool.allocate(6) == [4, 5, 3, 6, 7, 8]
    assert pool.get_cached_prefix(pool.hash_pages([7, 7, 8, 8])) == [1, 2]
    assert pool.allocate(1) == [2]  # evicts the second page: its hash is dropped
    assert pool.page_hash(2) is None and pool.num_evicted_pages == 1
    assert pool.get_cached_prefix(pool.hash_pages([7, 7, 8, 8])) == [1]


def test_eviction_is_lru_across_requests() -> None:
    pool = BlockPool(num_pages=5, page_size=1)
    old, new = alloc(pool, 2), alloc(pool, 2)
    assert (old, new) == ([1, 2], [3, 4])
    h_old, h_new = pool.hash_pages([10, 11], "t"), pool.hash_pages([20, 21], "t")
    pool.cache_pages(old, h_old)
    pool.cache_pages(new, h_new)
    pool.free(old)
    pool.free(new)
    assert pool.free_queue() == [2, 1, 4, 3]
    # Hitting the old prefix again makes it most recently used.
    assert pool.lookup_and_ref(h_old) == [1, 2]
    assert pool.free_queue() == [4, 3]
    pool.free([1, 2])
    assert pool.free_queue() == [4, 3, 2, 1]
    assert pool.allocate(2) == [4, 3]
    assert pool.get_cached_prefix(h_new) == [] and pool.get_cached_prefix(h_old) == [1, 2]


def test_ref_counts_shared_pages() -> None:
    pool = BlockPool(num_pages=4, page_size=2)
    pages = alloc(pool, 2)
    hashes = pool.hash_pages([1, 2, 3, 4, 5])  # 2 full pages, the 5th token is ignored
    assert len(hashes) == 2
    pool.cache_pages(pages, hashes)
    assert pool.lookup_and_ref(hashes) == [1, 2]  # a second sequence shares both pages
    assert pool.lookup_and_ref(hashes[:1]) == [1]  # a third shares the first
    assert [pool.ref_count(p) for p in (1, 2, 3)] == [3, 2, 0]
    assert pool.free_queue() == [3]
    pool.free([1, 2])
    pool.free([1])
    assert [pool.ref_count(p) for p in (1, 2)] == [1, 1] and pool.free_queue() == [3]
    pool.free(pages)
    assert pool.free_queue() == [3, 2, 1] and pool.usage == 0.0
    # A free cached page is found and pulled out of the middle of the free queue.
    assert pool.lookup_and_ref(hashes) == [1, 2]
    assert pool.free_queue() == [3] and pool.ref_count(1) == 1
    assert (pool.num_queried_pages, pool.num_hit_pages) == (5, 5)


def test_double_free_and_bad_ids_raise() -> None:
    pool = BlockPool(num_pages=3, page_size=2)
    pages = alloc(pool, 1)
    pool.free(pages)
    with pytest.raises(ValueError, match="double free"):
        pool.free(pages)
    with pytest.raises(ValueError, match="not an allocatable page"):
        pool.free([0])
    with pytest.raises(ValueError):
        BlockPool(num_pages=1, page_size=2)


def test_salts_isolate_tenants() -> None:
    pool = BlockPool(num_pages=8, page_size=2)
    tokens = [5, 6, 7, 8]
    ha, hb, hnone = (pool.hash_pages(tokens, s) for s in ("tenant-a", "tenant-b", None))
    assert len({ha[0], hb[0], hnone[0], pool.hash_pages(tokens, "")[0]}) == 4
    pages_a = alloc(pool, 2)
    pool.cache_pages(pages_a, ha)
    assert pool.lookup_and_ref(hb) == []  # tenant B never gets tenant A's pages
    assert pool.lookup_and_ref(hnone) == []  # nor does the unsalted default
    assert pool.lookup_and_ref(pool.hash_pages(tokens, "tenant-a")) == pages_a  # same salt
    assert (pool.num_queried_pages, pool.num_hit_pages) == (6, 2)


def test_hashes_are_chained_blake2b() -> None:
    pool = BlockPool(num_pages=2, page_size=3)
    tokens = [1, 2, 3, 4, 5, 6, 7]
    hashes = pool.hash_pages(tokens, "s")

    # Independent reference of the documented layout.
    def ref(parent: bytes | None, page: list[int]) -> bytes:
        head = b"R\x01" + (1).to_bytes(8, "little") + b"s" if parent is None else b"P" + parent
        return hashlib.blake2b(head + array("q", page).tobytes(), digest_size=16).digest()

    d0 = ref(None, [1, 2, 3])
    d1 = ref(d0, [4, 5, 6])
    assert hashes == [int.from_bytes(d, "little") for d in (d0, d1)]
    # A page's hash depends on everything before it and nothing after it.
    assert pool.hash_pages([1, 2, 3, 4, 5, 9], "s")[0] == hashes[0]
    assert pool.hash_pages([0, 2, 3, 4, 5, 6], "s")[1] != hashes[1]
    # Incremental extension equals hashing the whole sequence at once.
    assert pool.hash_pages(tokens[3:], "ignored", parent_hash=hashes[0]) == hashes[1:]
    assert hash_page(hashes[0], [4, 5, 6], None) == hashes[1]


def test_duplicate_content_keeps_first_cached_copy() -> None:
    pool = BlockPool(num_pages=4, page_size=2)
    h = pool.hash_pages([1, 2])
    first, second = alloc(pool, 1), alloc(pool, 1)
    pool.cache_pages(first, h)
    pool.cache_pages(second, h)  # computed the same page independently
    assert pool.page_hash(second[0]) is None and pool.get_cached_prefix(h) == first
    pool.free(first)
    pool.free(second)
    assert pool.free_queue() == [2, 3, 1]  # the uncached duplicate is reused first
    with pytest.raises(ValueError, match="not allocated"):
        pool.cache_pages(first, h)


def test_prefix_caching_disabled() -> None:
    pool = BlockPool(num_pages=4, page_size=2, enable_prefix_caching=False)
    pages = alloc(pool, 2)
    h = pool.hash_pages([1, 2, 3, 4])
    pool.cache_pages(pages, h)
    assert pool.num_cached_pages == 0
    pool.free(pages)
    assert pool.lookup_and_ref(h) == [] and pool.free_queue() == [1, 2, 3]


def test_reset_prefix_cache() -> None:
    pool = BlockPool(num_pages=4, page_size=2)
    pages = alloc(pool, 2)
    h = pool.hash_pages([1, 2, 3, 4])
    pool.cache_pages(pages, h)
    pool.reset_prefix_cache()
    assert pool.num_cached_pages == 0 and pool.get_cached_prefix(h) == []
    assert [pool.page_hash(p) for p in pages] == [None, None]
