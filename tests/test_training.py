import random

import pytest

from mmprune.embedded.training import SamplePool, warmup_cosine


def counter_pool():
    values = iter(range(1000))
    return SamplePool(lambda: next(values))


def test_pool_fill_refresh_draw():
    pool = counter_pool()
    pool.fill(5)
    assert pool.items == [0, 1, 2, 3, 4]
    pool.fill(5)  # already full: nothing new is made
    assert pool.made == 5
    rng = random.Random(0)
    pool.refresh(3, rng)
    assert pool.made == 8 and len(pool.items) == 5
    # the three new samples (5, 6, 7) replaced old ones, possibly one another
    assert set(pool.items) - {0, 1, 2, 3, 4} <= {5, 6, 7}
    assert 7 in pool.items
    drawn = pool.draw(50, random.Random(1))
    assert len(drawn) == 50 and set(drawn) <= set(pool.items)


def test_empty_pool_is_an_error():
    with pytest.raises(ValueError, match="fill"):
        counter_pool().draw(1, random.Random(0))


def test_warmup_cosine():
    assert warmup_cosine(0, 0.0, 10, 1.0) == pytest.approx(0.1)
    assert warmup_cosine(9, 0.0, 10, 1.0) == pytest.approx(1.0)
    assert warmup_cosine(10, 0.0, 10, 2.0) == pytest.approx(2.0)
    assert warmup_cosine(50, 0.5, 10, 1.0) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(99, 1.0, 10, 1.0) == pytest.approx(0.1)
    assert warmup_cosine(99, 3.0, 10, 1.0, floor=0.0) == pytest.approx(0.0)
