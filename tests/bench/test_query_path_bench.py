"""bench.query_path: a short run of both paths gives a time per query, every answer NOERROR,
and the cached path really answers from the cache."""

from __future__ import annotations

from bench import query_path


def test_both_paths_run_and_the_cached_one_hits_the_cache() -> None:
    for cached in (True, False):
        us = query_path.run(400, cached)  # asserts the answers and the cache hits itself
        assert 0 < us < 100_000
