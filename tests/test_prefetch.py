"""The producer thread of the device pipeline: order, overlap, errors and every way of stopping it."""

from __future__ import annotations

import contextlib
import threading

import pytest

from moco_transfer.pretrain.prefetch import Prefetcher


def test_items_arrive_in_order_and_the_thread_ends():
    producer = Prefetcher(iter(range(50)), depth=3)
    assert list(producer) == list(range(50))
    assert not producer.alive


def test_the_next_item_is_made_while_the_consumer_holds_the_current_one():
    making_second = threading.Event()

    def source():
        yield 0
        making_second.set()
        yield 1

    producer = Prefetcher(source(), depth=1)
    first = next(producer)
    # No timing: the producer must reach item 1 while the consumer has not asked for it yet.
    assert first == 0 and making_second.wait(timeout=10)
    assert next(producer) == 1
    producer.close()


def test_a_producer_error_reaches_the_consumer_with_its_type():
    def source():
        yield 1
        raise MemoryError("device ran out")

    producer = Prefetcher(source(), depth=2)
    assert next(producer) == 1
    with pytest.raises(MemoryError, match="device ran out"):
        next(producer)
    assert not producer.alive


@pytest.mark.parametrize("stop", ["break", "exception", "keyboard_interrupt"])
def test_a_consumer_that_stops_early_stops_the_producer_and_closes_its_source(stop):
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    producer = Prefetcher(endless(), depth=2)
    with pytest.raises((KeyboardInterrupt, RuntimeError)) if stop != "break" else contextlib.nullcontext():
        try:
            for i in producer:
                if i == 5:
                    if stop == "break":
                        break
                    raise KeyboardInterrupt if stop == "keyboard_interrupt" else RuntimeError("step failed")
        finally:
            producer.close()
    assert closed.wait(timeout=10) and not producer.alive  # the source's finally ran, in the producer thread


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(iter(()), depth=0)
