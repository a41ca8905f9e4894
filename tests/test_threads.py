"""ginseng._core.threads.background: order, bounded look-ahead, errors and shutdown."""

import threading

import pytest

from ginseng._core.threads import background


def test_yields_every_item_in_order_with_bounded_lookahead():
    produced = []

    def make():
        for i in range(50):
            produced.append(i)
            yield i

    it = background(make, depth=2, name="t-order")
    assert next(it) == 0
    threading.Event().wait(0.2)
    # One taken, two queued, at most one more produced and waiting to be queued.
    assert len(produced) <= 4
    assert [0, *it] == list(range(50))


def test_producer_error_is_raised_in_the_consumer():
    def make():
        yield 1
        raise KeyError("chunk 7 missing")

    it = background(make, depth=2, name="t-error")
    assert next(it) == 1
    with pytest.raises(KeyError, match="chunk 7 missing"):
        next(it)


def test_error_in_make_itself_is_raised_not_a_hang():
    def make():
        raise OSError("store not readable")

    with pytest.raises(OSError, match="store not readable"):
        next(background(make, depth=2, name="t-make"))


def test_close_stops_and_joins_the_thread_and_closes_the_producer():
    closed = threading.Event()

    def make():
        try:
            i = 0
            while True:  # an endless producer: only close() can end it
                yield i
                i += 1
        finally:
            closed.set()

    before = threading.active_count()
    it = background(make, depth=1, name="t-close")
    assert next(it) == 0
    it.close()
    assert closed.is_set()
    assert threading.active_count() == before
