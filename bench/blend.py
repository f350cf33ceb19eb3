"""Time and peak memory of building the published indices for 1e8, 1e9, 1e10 token budgets.

Synthetic token-file metadata (three sources, one small enough to be upsampled); each budget runs in
a fresh subprocess so its peak RSS is its own. Prints a table; not a test.

    python bench/blend.py [--seq-len 2048] [--budgets 1e8,1e9,1e10]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, time
import numpy as np
from pipeline.blend import build_indices
tokens, seq_len = int(float(sys.argv[1])), int(sys.argv[2])
batch = 512
instances = tokens // (batch * seq_len) * batch
# source sizes: web-like (2x the need), code (1x), a small one upsampled ~4 epochs
shares = [0.6, 0.3, 0.1]
chunks = [max(1, int(2.0 * 0.6 * instances)), max(1, int(1.0 * 0.3 * instances)), max(1, int(0.025 * instances))]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
idx, counts = build_indices(chunks, shares, instances, seq_len, seed=1)
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"instances": instances, "seconds": dt, "peak_mb": peak / 1024, "base_mb": base / 1024,
                  "indices_mb": idx.nbytes / 2**20}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--budgets", default="1e8,1e9,1e10")
    args = ap.parse_args()
    rows = []
    for b in args.budgets.split(","):
        out = subprocess.run([sys.executable, "-c", CHILD, b, str(args.seq_len)], capture_output=True,
                             text=True, check=True)
        rows.append((float(b), json.loads(out.stdout)))
    print(f"blend: build_indices, seq_len {args.seq_len}, global batch 512, 3 sources (one upsampled)\n")
    print("| tokens | instances | seconds | s per 1e9 tokens | peak RSS MB | indices MB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for b, r in rows:
        print(f"| {b:.0e} | {r['instances']:,} | {r['seconds']:.2f} | {r['seconds'] / b * 1e9:.2f} | "
              f"{r['peak_mb']:.0f} | {r['indices_mb']:.0f} |")
    first, last = rows[0], rows[-1]
    growth = (last[1]["seconds"] / first[1]["seconds"]) / (last[0] / first[0])
    print(f"\ntime growth vs linear from {first[0]:.0e} to {last[0]:.0e}: {growth:.2f}x "
          f"(1.0 = exactly linear); peak RSS at {last[0]:.0e}: {last[1]['peak_mb']:.0f} MB (limit 2048)")


if __name__ == "__main__":
    main()
