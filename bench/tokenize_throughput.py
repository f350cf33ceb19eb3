"""Tokenize throughput (MB/s of UTF-8 text) of the tokenize stage's encoder on this machine.

Trains a BPE on the python-docs source (or loads artifacts/tokenizer if present), then encodes the
python-code and python-docs sources with the stage's own `encode_to_npy`, single-threaded vs all
cores (RAYON_NUM_THREADS), each in a fresh subprocess. Prints a table; not a test.
"""

from __future__ import annotations

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
from tokenizers import Tokenizer
docs = python_code() + python_docs()
tdir = Path("artifacts/tokenizer/tokenizer.json")
tok = Tokenizer.from_file(str(tdir)) if tdir.is_file() else train_bpe(docs[:300], 4096, 2)
mb = sum(len(d.encode()) for d in docs) / 2**20
with tempfile.TemporaryDirectory() as d:
    t = time.perf_counter()
    n, nd = encode_to_npy(tok, docs, tok.token_to_id(EOS) or 0, np.dtype(np.uint16), Path(d) / "x.npy",
                          Path(d) / "x_docs.npy", 512, "encode")
    dt = time.perf_counter() - t
print(json.dumps({"mb": mb, "seconds": dt, "tokens": n, "docs": nd}))
"""


def main() -> None:
    cores = os.cpu_count() or 1
    rows = []
    for threads in sorted({1, cores}):
        env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true"}
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, check=True)
        rows.append((threads, json.loads(out.stdout)))
    print(f"tokenize: byte-level BPE (vocab 4096) over the python-code + python-docs sources\n")
    print("| threads | MB | seconds | MB/s | tokens/s | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    base = rows[0][1]["seconds"]
    for threads, r in rows:
        print(f"| {threads} | {r['mb']:.1f} | {r['seconds']:.2f} | {r['mb'] / r['seconds']:.2f} | "
              f"{r['tokens'] / r['seconds']:,.0f} | {base / r['seconds']:.2f}x |")


if __name__ == "__main__":
    main()
