"""Run several benchmarks at once, each in its own process (``python -m benchmarks --jobs N``).

Benchmarks are independent (each reads the section cache and writes its own JSON file), so on an
N-core machine they can run side by side. Each child is ``python -m benchmarks --only NAME
--no-page`` with the parent's options; the parent starts the longest expected benchmarks first
(longest-processing-time-first scheduling, using the wall time of each benchmark's last result),
waits for all of them and then builds the page once. Speeds measured in a child share the machine
with the other children; the load average recorded with each result shows it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks._common import RESULTS_DIR, ROOT

from bitro._logging import logger

#: Expected wall seconds of a standard run when no earlier result is on disk (2-core reference machine).
DEFAULT_SECONDS = {"accuracy": 900.0, "bulk": 1200.0, "cells": 270.0, "embedding": 190.0, "pipeline": 130.0}


def expected_seconds(name: str, results_dir: Path = RESULTS_DIR) -> float:
    """Wall time of the last result of ``name`` (or a default), used to order the queue."""
    path = results_dir / f"{name}.json"
    try:
        return float(json.loads(path.read_text())["meta"]["wall_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_SECONDS.get(name, 60.0)


def schedule(names: Sequence[str], results_dir: Path = RESULTS_DIR) -> list[str]:
    """``names`` ordered longest expected first (ties keep the given order)."""
    return sorted(dict.fromkeys(names), key=lambda n: -expected_seconds(n, results_dir))


def run_parallel(names: Sequence[str], child_args: Sequence[str], jobs: int) -> dict[str, int]:
    """Run each benchmark in a child process, at most ``jobs`` at a time; return the exit codes.

    A failing child is logged and the others carry on (as in a sequential run).
    """
    queue = schedule(names, RESULTS_DIR)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    codes: dict[str, int] = {}
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    while queue or running:
        while queue and len(running) < jobs:
            name = queue.pop(0)
            cmd = [sys.executable, "-m", "benchmarks", "--only", name, "--no-page", *child_args]
            logger.info("benchmarks: starting %s in a child process (%d running)", name, len(running) + 1)
            running[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env), time.perf_counter())
        time.sleep(1.0)
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            codes[name] = proc.returncode
            log = logger.info if proc.returncode == 0 else logger.error
            log(
                "benchmarks: %s finished with exit code %d in %.0f s",
                name,
                proc.returncode,
                time.perf_counter() - t0,
            )
    return codes
