"""herald run settles the cyclic garbage collector before it starts consuming."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from consumer.service import GC_YOUNG_THRESHOLD, settle_garbage_collector


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_startup_objects_are_frozen_and_young_collections_are_rarer(restored_gc: None) -> None:
    gc.unfreeze()
    _, middle, old = gc.get_threshold()
    settle_garbage_collector()
    assert gc.get_freeze_count() > 1000  # the modules and their objects
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, middle, old)
    assert GC_YOUNG_THRESHOLD > 700  # CPython's default


def test_cyclic_garbage_is_still_collected_without_being_asked(restored_gc: None) -> None:
    settle_garbage_collector()

    class Node:
        def __init__(self) -> None:
            self.me = self

    node = Node()
    alive = weakref.ref(node)
    del node
    assert alive() is not None  # a cycle: reference counting alone cannot free it
    # Containers kept alive count towards the next young collection.
    kept: list[list[int]] = [[] for _ in range(3 * GC_YOUNG_THRESHOLD)]
    assert alive() is None
    assert len(kept) == 3 * GC_YOUNG_THRESHOLD
