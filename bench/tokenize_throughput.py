"""Tokenize throughput of the tokenize stage's encoder: local executor vs Ray with 1, 2, N workers.

Encodes the python-code and python-docs sources (or --repeat times them) with the stage's own
`encode_to_npy`: the local executor single-threaded and with every core (RAYON_NUM_THREADS), then
Ray (one local Ray of N CPUs, started before the clock runs; one thread per worker) with 1, 2
and N workers. Each row's token file sha256 is printed too: they must all be equal. Prints one
table; not a test.

    python bench/tokenize_throughput.py [--workers N] [--batch-docs 64] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, tempfile, time
from pathlib import Path
import numpy as np
from pipeline.sources.python_stdlib import python_code, python_docs
from pipeline.tokenizer import train_bpe, EOS
from pipeline.tokenize import encode_to_npy
from pipeline.core.io import sha256_file
from tokenizers import Tokenizer

mode, workers, batch_docs, repeat = sys.argv[1], [int(w) for w in sys.argv[2].split(",")], int(sys.argv[3]), int(sys.argv[4])
docs = (python_code() + python_docs()) * repeat
tdir = Path("artifacts/tokenizer/tokenizer.json")
tok = Tokenizer.from_file(str(tdir)) if tdir.is_file() else train_bpe(docs[:300], 4096, 2)
mb = sum(len(d.encode()) for d in docs) / 2**20
eos = tok.token_to_id(EOS) or 0


def encode(executor):
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        n, nd = encode_to_npy(tok, docs, eos, np.dtype(np.uint16), Path(d) / "x.npy", Path(d) / "x_docs.npy",
                              batch_docs, "encode", executor=executor)
        dt = time.perf_counter() - t
        return {"mb": mb, "seconds": dt, "tokens": n, "docs": nd, "sha256": sha256_file(Path(d) / "x.npy"),
                "vocab": tok.get_vocab_size()}


if mode == "local":
    print(json.dumps([encode(None)]))
else:
    from pipeline.core.executor import RayExecutor
    import ray
    t = time.perf_counter()
    start = RayExecutor(max(workers))  # starts a local Ray with max(workers) CPUs
    started = time.perf_counter() - t
    warm = RayExecutor(max(workers))   # start the worker processes before the clock runs
    list(warm.map(lambda x: x, [(i,) for i in range(4 * max(workers))]))
    rows = []
    for w in workers:
        ex = RayExecutor(w)
        rows.append({**encode(ex), "workers": w, "ray_start_seconds": started})
    start.close()
    print(json.dumps(rows))
"""


def child(mode: str, workers: list[int], batch_docs: int, repeat: int, threads: int | None) -> list[dict]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true"}
    if threads is not None:
        env["RAYON_NUM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, "-c", CHILD, mode, ",".join(map(str, workers)), str(batch_docs),
                          str(repeat)], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="N, the largest Ray row")
    ap.add_argument("--batch-docs", type=int, default=64, help="tokenize.batch_docs (a unit is 4 batches)")
    ap.add_argument("--repeat", type=int, default=1, help="encode the documents this many times over")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    rows = []
    for threads in sorted({1, cores}):
        r = child("local", [1], args.batch_docs, args.repeat, threads)[0]
        rows.append((f"local, {threads} thread{'s' if threads > 1 else ''}", r))
    ray_workers = sorted({1, 2, args.workers})
    ray_rows = child("ray", ray_workers, args.batch_docs, args.repeat, None)
    rows += [(f"ray, {r['workers']} worker{'s' if r['workers'] > 1 else ''}", r) for r in ray_rows]
    r0 = rows[0][1]
    print(f"tokenize: byte-level BPE (vocab {r0['vocab']}), python-code + python-docs x{args.repeat}: "
          f"{r0['mb']:.1f} MB, {r0['docs']:,} documents, {r0['tokens']:,} tokens; {cores} cores; "
          f"units of {4 * args.batch_docs} documents; Ray start {ray_rows[0]['ray_start_seconds']:.1f} s "
          "(not counted)\n")
    print("| executor | seconds | MB/s | tokens/s | speed-up | token file sha256 |")
    print("|---|---:|---:|---:|---:|---|")
    for name, r in rows:
        print(f"| {name} | {r['seconds']:.2f} | {r['mb'] / r['seconds']:.2f} | {r['tokens'] / r['seconds']:,.0f} | "
              f"{r0['seconds'] / r['seconds']:.2f}x | {r['sha256'][:16]}… |")
    if len({r["sha256"] for _, r in rows}) != 1:
        sys.exit("token files differ between executors")


if __name__ == "__main__":
    main()
