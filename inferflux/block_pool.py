"""KV page allocator with ref counts, an eviction-ordered free queue and a prefix cache.

Plain Python (no JAX). Pages hold `page_size` tokens of KV. Page 0 is a reserved dump page for
padding slots and is never handed out. Prefix caching follows vLLM v1: every FULL page of a
sequence gets a chained hash `H(parent_hash, tokens of the page)` (the first page mixes in the
tenant's `cache_salt` instead of a parent). A page whose ref count drops to 0 keeps its hash
and stays findable while it sits in the free queue; its hash is dropped only when the page is
reallocated (evicted).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

# NOTE: 128-bit digests: a 64-bit hash can be brute-forced into a collision (~2^32 tries),
# which would let one tenant read another's KV. blake2b is in the stdlib and fast.
_DIGEST_BYTES = 16


def hash_page(parent_hash: int | None, token_ids: Sequence[int], salt: str | None) -> int:
    """Chained hash of one full page. `salt` only counts for the first page (no parent)."""
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    if parent_hash is None:
        # NOTE: None and "" are different salts; the length prefix keeps salt and tokens apart.
        if salt is None:
            h.update(b"R\x00")
        else:
            raw = salt.encode("utf-8")
            h.update(b"R\x01" + len(raw).to_bytes(8, "little") + raw)
    else:
        h.update(b"P" + parent_hash.to_bytes(_DIGEST_BYTES, "little"))
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


class BlockPool:
    """Hands out KV pages 1..num_pages-1 and caches full pages by chained hash.

    Contract:
    - `allocate(n)` takes pages from the head of the free queue (evicting any cached hash they
      carry) and sets their ref count to 1; it returns None and changes nothing if fewer than
      `n` pages are free.
    - `free(pages)` decrements ref counts; pages reaching 0 are queued in reverse order (the
      sequence's last page first). Pages that carry a hash go to the TAIL (evicted last, so
      prefix heads survive longest); pages without one go to the HEAD (reused first).
    - `lookup_and_ref(hashes)` returns the longest cached prefix of `hashes` and takes a
      reference on each page (pulling it out of the free queue if its ref count was 0).
    """

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref: list[int] = [0] * num_pages
        self._hash: list[int | None] = [None] * num_pages  # the full page's hash, if cached
        self._cached: dict[int, int] = {}  # hash -> page id
        # NOTE: OrderedDict as the free queue: O(1) pop at both ends and removal from the middle.
        self._free: OrderedDict[int, None] = OrderedDict((p, None) for p in range(1, num_pages))
        self.num_queried_pages = 0  # pages looked up by lookup_and_ref
        self.num_hit_pages = 0  # of those, pages found in the cache
        self.num_evicted_pages = 0  # cached pages whose hash was dropped on reallocation

    # ---------------------------------------------------------------- accounting
    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        """Pages with ref count 0 (including cached ones that may still be hit)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of usable pages with ref count > 0."""
        return 1.0 - len(self._free) / self.num_usable_pages

    @property
    def num_cached_pages(self) -> int:
        return len(self._cached)

    def ref_count(self, page_id: int) -> int:
        return self._ref[page_id]

    def page_hash(self, page_id: int) -> int | None:
        return self._hash[page_id]

    def free_queue(self) -> list[int]:
        """The free queue, head (next to be allocated) first. O(num_free); for tests and debug."""
        return list(self._free)

    # ---------------------------------------------------------------- allocation
    def allocate(self, n: int) -> list[int] | None:
        """Take `n` pages from the head of the free queue; None (and no change) if too few."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            return None
        pages = []
        for _ in range(n):
            page, _ = self._free.popitem(last=False)
            self._evict(page)
            self._ref[page] = 1
            pages.append(page)
        return pages

    def free(self, page_ids: Sequence[int]) -> None:
        """Drop one reference on each page; pages reaching 0 re-enter the free queue."""
        for page in reversed(page_ids):
            if page <= 0 or page >= self.num_pages:
                raise ValueError(f"page id {page} is not an allocatable page")
            if self._ref[page] <= 0:
                raise ValueError(f"double free of page {page}")
            self._ref[page] -= 1
            if self._ref[page] == 0:
                self._free[page] = None
                if self._hash[page] is None:
                    self._free.move_to_end(page, last=False)

    def ref(self, page_ids: Sequence[int]) -> None:
        """Take one more reference on each page (pulling free ones out of the free queue)."""
        for page in page_ids:
            if page <= 0 or page >= self.num_pages:
                raise ValueError(f"page id {page} is not an allocatable page")
            if self._ref[page] == 0:
                del self._free[page]
            self._ref[page] += 1

    def _evict(self, page: int) -> None:
        h = self._hash[page]
        if h is not None:
            self._hash[page] = None
            if self._cached.get(h) == page:
                del self._cached[h]
            self.num_evicted_pages += 1

    # ---------------------------------------------------------------- prefix cache
    def hash_pages(
        self,
        token_ids: Sequence[int],
        salt: str | None = None,
        parent_hash: int | None = None,
    ) -> list[int]:
        """One chained hash per FULL page of `token_ids` (a trailing partial page gets none).

        `token_ids` must start on a page boundary; `parent_hash` is the hash of the page just
        before it (None: `token_ids` starts the sequence, and `salt` is mixed in). Sequences only
        grow, so callers can extend their hash list page by page.
        """
        ps = self.page_size
        hashes = []
        for k in range(len(token_ids) // ps):
            parent_hash = hash_page(parent_hash, token_ids[k * ps : (k + 1) * ps], salt)
            hashes.append(parent_hash)
        return hashes

    def get_cached_prefix(self, hashes: Sequence[int]) -> list[int]:
        """Pages of the longest cached prefix of `hashes`. No side effects."""
        if not self.enable_prefix_caching:
            return []
        pages = []
        for h in hashes:
            page = self._cached.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def num_free_in(self, page_ids: Sequence[int]) -> int:
        """How many of `page_ids` sit in the free queue (ref count 0)."""
        return sum(1 for p in page_ids if self._ref[p] == 0)

    def lookup_and_ref(self, hashes: Sequence[int]) -> list[int]:
        """Longest cached prefix of `hashes`, with a reference taken on each page; counts hits."""
        pages = self.get_cached_prefix(hashes)
        self.ref(pages)
        self.num_queried_pages += len(hashes)
        self.num_hit_pages += len(pages)
        return pages

    def cache_pages(self, page_ids: Sequence[int], hashes: Sequence[int]) -> None:
        """Register full pages under their hashes (pairs by position; extra entries ignored).

        A page that already has a hash is left alone. If another page already holds the same
        hash (two sequences computed the same content), the first one stays the cached copy.
        """
        if not self.enable_prefix_caching:
            return
        for page, h in zip(page_ids, hashes, strict=False):
            if self._ref[page] <= 0:
                raise ValueError(f"cannot cache page {page}: it is not allocated")
            if self._hash[page] is not None or h in self._cached:
                continue
            self._hash[page] = h
            self._cached[h] = page

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (pages in use keep their KV; they just cannot be hit)."""
        for page in self._cached.values():
            self._hash[page] = None
        self._cached.clear()
        # NOTE: pages that were kept at the tail for their hash are now plain free pages; their
        # position does not matter for correctness, so the queue is left as it is.

    @property
    def hit_rate(self) -> float:
        return self.num_hit_pages / self.num_queried_pages if self.num_queried_pages else 0.0
