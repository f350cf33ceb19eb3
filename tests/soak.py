"""Stability proof for every test that starts real processes (torchft, torchrun, DeepSpeed, kill/resume).

    python tests/soak.py                  # each multi-process test 20 times on an idle machine
    python tests/soak.py --hog            # ... with a CPU hog beside it (one busy process per core)
    python tests/soak.py --runs 5 -k torchft

Runs one pytest session with `--repeat N` (tests/conftest.py), so session fixtures (the micro data
chain, the reference run) are built once and each test itself runs N times in a row; then prints
a table of passes per test. Exit status 1 if any test passed fewer than N times. Not part of
`make test` (it takes hours for the whole list on 2 cores); `make soak` runs it.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# every test that starts more than one process, or kills one (node ids or files)
MULTI_PROCESS = [
    "tests/test_lowcomm_torchft.py::test_sigkilled_worker_does_not_stop_the_run_and_heals_when_restarted",
    "tests/test_lowcomm_torchft.py::test_late_joiner_heals_from_a_peer_and_trains_on",
    "tests/test_lowcomm_torchft.py::test_one_replica_on_torchft_equals_plain_diloco",
    "tests/test_pretrain_torchft.py",
    "tests/test_multinode.py::test_two_nodes_on_one_host_equal_one_node",
    "tests/test_lowcomm_elastic.py",
    "tests/test_lowcomm_trainer.py",
    "tests/test_comm.py",
    "tests/test_lowcomm.py::test_two_worker_diloco_is_deterministic_and_resumable",
    "tests/test_lowcomm.py::test_sanity_anchor_diloco_h1_sgd_equals_ddp",
    "tests/test_pretrain.py::test_sigterm_then_resume_is_bitwise_identical",
    "tests/test_pretrain.py::test_kill9_after_checkpoint_then_resume_is_bitwise_identical",
    "tests/test_pretrain.py::test_two_torchrun_workers_sigterm_resume_bitwise",
    "tests/test_pretrain.py::test_deepspeed_zero2_two_cpu_workers_matches_ddp_and_resumes_bitwise",
    "tests/test_pretrain.py::test_deepspeed_real_divergence_stops_with_exit_2",
    "tests/test_data_filters.py::test_hf_ingest_streams_shards_and_resumes_after_a_kill",
    "tests/test_data_executor.py::test_ray_with_1_and_4_workers_is_byte_identical_to_local",
    "tests/test_trust.py::test_two_runs_at_once_the_second_refuses_naming_the_first",
    "tests/test_trust.py::test_kill_between_outputs_never_mixes_two_runs",
]
# tests whose processes start in a module-scoped fixture: `--repeat` would run the fixture once,
# so these get a fresh pytest session per run instead
PER_SESSION = ["tests/test_torchft_crosscheck.py"]


def _hog(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20, help="times each test runs (default 20)")
    ap.add_argument("--hog", action="store_true", help="keep every core busy with a CPU hog meanwhile")
    ap.add_argument("-k", default=None, help="pytest -k expression to narrow the list")
    ap.add_argument("tests", nargs="*", help="node ids or files (default: every multi-process test)")
    args = ap.parse_args()

    hogs, stop = [], mp.Event()
    if args.hog:
        hogs = [mp.Process(target=_hog, args=(stop,), daemon=True) for _ in range(os.cpu_count() or 2)]
        for h in hogs:
            h.start()
    chosen = args.tests or MULTI_PROCESS + PER_SESSION
    repeat = [t for t in chosen if not any(t.startswith(f) for f in PER_SESSION)]
    per_session = [t for t in chosen if t not in repeat]
    loads: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        base_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    *(["-k", args.k] if args.k else [])]
        runs = []   # (junit xml, pytest command)
        if repeat:
            runs.append((Path(tmp) / "soak.xml", [*base_cmd, f"--repeat={args.runs}", *repeat]))
        for i in range(args.runs if per_session else 0):
            runs.append((Path(tmp) / f"session{i:02d}.xml", [*base_cmd, *per_session]))
        t0 = time.monotonic()
        try:
            for xml, cmd in runs:
                proc = subprocess.Popen([*cmd, f"--junitxml={xml}"], cwd=ROOT)
                while proc.poll() is None:   # sample the load average while the tests run
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        loads.append(os.getloadavg()[0])
        finally:
            stop.set()
            for h in hogs:
                h.join(timeout=5)
        wall = time.monotonic() - t0
        xmls = [x for x, _ in runs if x.exists()]
        if len(xmls) < len(runs):
            print(f"soak: pytest wrote {len(xmls)} of {len(runs)} reports", file=sys.stderr)
        stats: dict[str, list] = collections.defaultdict(lambda: [0, 0, 0, []])   # pass, fail, skip, secs
        for case in (c for x in xmls for c in ET.parse(x).iter("testcase")):
            # the repeat id is the first or the last of the ids: test_x[run03-int4] / test_x[int4-run03]
            # -> test_x[int4]; test_x[run03] -> test_x
            name = re.sub(r"\[run\d+-", "[", case.get("name", ""))
            name = re.sub(r"\[\]$", "", re.sub(r"-?run\d+(?=\])", "", name))
            base = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{name}"
            s = stats[base]
            if case.find("failure") is not None or case.find("error") is not None:
                s[1] += 1
            elif case.find("skipped") is not None:
                s[2] += 1
            else:
                s[0] += 1
            s[3].append(float(case.get("time", 0)))
    print(f"\nsoak: {args.runs} runs per test, {'CPU hog on every core' if args.hog else 'no hog'}, "
          f"wall {wall / 60:.1f} min, 1-min load average mean {sum(loads) / max(len(loads), 1):.1f} "
          f"(min {min(loads, default=0):.1f}, max {max(loads, default=0):.1f}) on {os.cpu_count()} cores")
    print(f"{'test':<90} {'pass':>6} {'fail':>5} {'skip':>5} {'mean s':>7} {'max s':>7}")
    bad = False
    for base, (p, f, sk, secs) in sorted(stats.items()):
        print(f"{base:<90} {p:>3}/{args.runs:<2} {f:>5} {sk:>5} {sum(secs) / len(secs):>7.1f} {max(secs):>7.1f}")
        bad |= p < args.runs and sk == 0
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
