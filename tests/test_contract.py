import threading

import pytest
import torch

from factorized_layers.contract import ContractionCache, contract, contraction_path


def test_cache_counts_hits_and_misses_and_evicts_lru():
    cache = ContractionCache(maxsize=2)
    cache.expression("ij,jk->ik", (2, 3), (3, 4))
    cache.expression("ij,jk->ik", (2, 3), (3, 4))
    assert cache.info()[:2] == (1, 1)
    cache.expression("ij,jk->ik", (5, 3), (3, 4))
    cache.expression("ij,jk->ik", (2, 3), (3, 4))  # refresh: (5, 3) is now least recent
    cache.expression("ij,jk->ik", (6, 3), (3, 4))  # evicts (5, 3)
    assert cache.info().currsize == 2
    cache.expression("ij,jk->ik", (5, 3), (3, 4))
    info = cache.info()
    assert (info.hits, info.misses, info.currsize) == (2, 4, 2)
    cache.clear()
    assert cache.info()[:2] == (0, 0) and cache.info().currsize == 0


def test_cache_is_thread_safe():
    cache = ContractionCache(maxsize=8)
    errors = []

    def worker(offset):
        try:
            for i in range(200):
                n = 1 + (i + offset) % 12
                cache.expression("bi,ri,or->bo", (n, 6), (2, 6), (3, 2))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    info = cache.info()
    assert info.hits + info.misses == 8 * 200
    assert info.currsize <= 8


def test_contract_matches_einsum_and_tracks_operand_updates():
    cache = ContractionCache()
    a = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 6, dtype=torch.float64)
    c = torch.randn(6, 3, dtype=torch.float64)
    out = contract("ij,jk,kl->il", a, b, c, cache=cache)
    torch.testing.assert_close(out, torch.einsum("ij,jk,kl->il", a, b, c))
    out.sum().backward()
    assert a.grad is not None
    with torch.no_grad():
        a.mul_(2)  # an optimizer step: a cached expression must not hold stale values
    torch.testing.assert_close(
        contract("ij,jk,kl->il", a, b, c, cache=cache), torch.einsum("ij,jk,kl->il", a, b, c)
    )
    assert cache.info().hits == 1


def test_contraction_path_depends_on_batch_size():
    small = contraction_path("bi,ri,or->bo", (1, 64), (64, 64), (64, 64))
    large = contraction_path("bi,ri,or->bo", (4096, 64), (64, 64), (64, 64))
    assert small[0] == (0, 1)
    assert large[0] == (1, 2)


def test_bad_maxsize():
    with pytest.raises(ValueError, match="maxsize must be a positive integer, got 0"):
        ContractionCache(maxsize=0)
