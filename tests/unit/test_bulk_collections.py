"""Bulk jobs' collector setting: raised while they run, as before once the last one ends."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from app.domain.bulk import BULK_GC_THRESHOLD, fewer_collections


@pytest.fixture
def default_thresholds() -> Iterator[tuple[int, int, int]]:
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield (700, 10, 10)
    gc.set_threshold(*before)


def test_young_passes_are_spaced_within_the_block_only(default_thresholds: tuple[int, int, int]) -> None:
    with fewer_collections():
        assert gc.get_threshold() == (BULK_GC_THRESHOLD, 10, 10)
    assert gc.get_threshold() == default_thresholds


def test_overlapping_blocks_restore_the_first_ones_settings_whatever_ends_first(
    default_thresholds: tuple[int, int, int],
) -> None:
    # Two rebuilding tasks of one process: the first to start ends first, the other still runs.
    first, second = fewer_collections(), fewer_collections()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert gc.get_threshold() == (BULK_GC_THRESHOLD, 10, 10)
    second.__exit__(None, None, None)
    assert gc.get_threshold() == default_thresholds


def test_a_failing_block_restores_the_settings(default_thresholds: tuple[int, int, int]) -> None:
    with pytest.raises(RuntimeError), fewer_collections():
        raise RuntimeError("the store went away")
    assert gc.get_threshold() == default_thresholds


def test_a_higher_setting_of_the_process_is_kept(default_thresholds: tuple[int, int, int]) -> None:
    gc.set_threshold(BULK_GC_THRESHOLD * 2, 10, 10)
    with fewer_collections():
        assert gc.get_threshold() == (BULK_GC_THRESHOLD * 2, 10, 10)
    assert gc.get_threshold() == (BULK_GC_THRESHOLD * 2, 10, 10)
