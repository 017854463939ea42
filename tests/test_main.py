"""The command line's process set-up."""

from __future__ import annotations

import os

import pytest

from vq4dit.__main__ import cap_threads


@pytest.mark.parametrize("requested, expected", [("64", None), ("1", "1"), ("", "")])
def test_threads_are_capped_at_the_cpu_mask(monkeypatch, requested, expected):
    """Snakemake's OMP_NUM_THREADS never exceeds the CPUs this process may run on; unset stays unset."""
    monkeypatch.setenv("OMP_NUM_THREADS", requested)
    cap_threads()
    cpus = len(os.sched_getaffinity(0))
    assert os.environ["OMP_NUM_THREADS"] == (str(min(64, cpus)) if expected is None else expected)
