"""The command line's process set-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vq4dit.__main__ import cap_threads


@pytest.mark.parametrize("requested, expected", [("64", None), ("1", "1"), ("", "")])
def test_threads_are_capped_at_the_cpu_mask(monkeypatch, requested, expected):
    """Snakemake's OMP_NUM_THREADS never exceeds the CPUs this process may run on; unset stays unset."""
    monkeypatch.setenv("OMP_NUM_THREADS", requested)
    cap_threads()
    cpus = len(os.sched_getaffinity(0))
    assert os.environ["OMP_NUM_THREADS"] == (str(min(64, cpus)) if expected is None else expected)


def test_the_command_line_flushes_its_output_before_it_skips_teardown():
    """``python -m vq4dit`` ends with os._exit (exit_now): what it printed to a block-buffered pipe still arrives."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run([sys.executable, "-m", "vq4dit", "size", "--arch", "DiT-S/2", "--json"],
                          capture_output=True, text=True, env=env, check=True)
    assert json.loads(done.stdout)["arch"] == "DiT-S/2"
