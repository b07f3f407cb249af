"""Thread counts follow the cores this process may use: its affinity and its cgroup's CPU quota."""

from __future__ import annotations

import os

import pytest

from bentoformers.runtime.cpu import usable_cores
from bentoformers.settings import Settings

AFFINITY = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({}, AFFINITY),  # no cgroup files: the affinity
        ({"cpu.max": "max 100000\n"}, AFFINITY),  # v2, no limit
        ({"cpu.max": "50000 100000\n"}, 1),  # half a core rounds up to one thread
        ({"cpu.max": "100000 100000\n"}, 1),
        ({"cpu.max": "6400000 100000\n"}, AFFINITY),  # a quota above the affinity: the affinity
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, AFFINITY),  # v1, no limit
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
    ],
)
def test_usable_cores_reads_the_quota(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert usable_cores(str(tmp_path)) == expected


def test_threads_setting_overrides_and_defaults_to_usable_cores():
    assert Settings(intra_op_threads=3).threads() == 3
    assert Settings().threads() == usable_cores()


def test_malloc_arenas_are_capped_unless_the_environment_says_otherwise(monkeypatch):
    from bentoformers.runtime.cpu import cap_malloc_arenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert cap_malloc_arenas(2) is False  # the operator's value stands
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert cap_malloc_arenas(2) is True  # glibc (Debian, the images) takes it
