"""Process memory settings (scripts.memory): glibc keeps freed large blocks for reuse; start-up objects frozen."""

import gc
import platform
import sys
import weakref

import pytest
import torch

from scripts import memory


def test_disabled_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setattr(memory, "_applied", None)
    assert memory.keep_freed_memory(False) is False
    assert memory.keep_freed_memory("false") is False
    assert memory._applied is None  # nothing was attempted
    with pytest.raises(ValueError, match="keep_freed_memory"):
        memory.keep_freed_memory("maybe")


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only"
)
def test_glibc_accepts_the_settings_and_large_tensors_still_work(monkeypatch):
    monkeypatch.setattr(memory, "_applied", None)
    assert memory.keep_freed_memory(True) is True
    assert memory.keep_freed_memory() is True  # idempotent
    for _ in range(3):  # blocks of 64 MB come from the heap now and are reused
        x = torch.ones(16 * 2**20)
        assert float(x.sum()) == 16 * 2**20
        del x


def test_start_up_objects_are_frozen_once_and_later_objects_stay_collectable(monkeypatch):
    class Node:
        pass

    def garbage_cycle():
        node = Node()
        node.me = node
        return weakref.ref(node)  # the cycle is unreachable once this returns: only the collector frees it

    monkeypatch.setattr(memory, "_frozen", False)
    was_enabled = gc.isenabled()
    gc.disable()  # no automatic collection between the steps below
    gc.unfreeze()
    try:
        assert memory.freeze_startup_objects(False) == 0  # disabled: the collector is left alone
        with pytest.raises(ValueError, match="freeze_startup_objects"):
            memory.freeze_startup_objects("maybe")
        early = garbage_cycle()
        before = memory.freeze_startup_objects()
        assert before > 1000  # the imports' objects (torch, pytest) now sit in the permanent generation
        late = garbage_cycle()
        # a second call freezes nothing more (the count may fall: frozen objects still die by reference counting)
        assert memory.freeze_startup_objects() <= before
        gc.collect()
        assert late() is None  # made after the freeze: collected as before
        assert early() is not None  # alive at the freeze: never walked again by the collector
        gc.unfreeze()
        gc.collect()
        assert early() is None
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()
