"""Ingest for the kill test: after K units are committed it writes a file, then waits to be killed.

usage: python tests/ingest_kill_worker.py RECIPE K REACHED_FILE
"""

import sys
import threading
from pathlib import Path

from pipeline import ingest
from pipeline.core.config import load_recipe

recipe, k, reached = load_recipe(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
done = []


def on_unit(source: str, i: int, n: int) -> None:
    done.append((source, i))
    if len(done) == k:
        reached.write_text(f"{source} {i} {n}\n")
        threading.Event().wait(300)  # the test kills this process; never finish by ourselves
        sys.exit(3)


ingest.run(recipe, on_unit=on_unit)
sys.exit(4)  # fewer than K units: the test fails on this exit code
