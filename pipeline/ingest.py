"""ingest: every source of the data manifest → sharded JSONL documents + sha256 per shard.

Output `artifacts/ingest/`: `<source>/shard-00000.jsonl` ({"text": ...} per line), `ingest.json`
(per source: kind, license, documents, bytes, shard hashes, one content sha256, and
`raw_documents` / `removed`: how many documents each filter step removed), and
`provenance.json`. With `data.lock: true` the content sha256 of each source is checked against
`data_manifests/<mix>.lock.json`; a mismatch stops the stage naming the source (training data
never changes silently). `omp ingest --update-lock` writes that lock file.

Each source is cut into units (`data.unit_docs` raw documents, or one shard of a hub dataset),
and the per-document filters run per unit on the recipe's executor (`data.executor: local | ray`,
pipeline/core/executor.py). Each finished unit is committed to `artifacts/.ingest.work/` at once, so a
run that is killed resumes where it stopped: units already there (same source config, same input)
are not read again, and none is counted twice. Dedup, order and limits then run per source in
the driver (pipeline/sources/filters.py), so the output does not depend on the executor.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from pipeline.core.config import HFSource, Recipe, load_manifest, manifest_lock_path
from pipeline.core.errors import DataIntegrityError, PipelineError
from pipeline.core.executor import make_executor
from pipeline.core.io import (atomic_dir, atomic_write_bytes, atomic_write_text, canonical_json, read_json,
                         sha256_bytes, sha256_file, write_json)
from pipeline.core.paths import OUT as STAGE_OUT
from pipeline.core.provenance import provenance
from pipeline.core.log import status
from pipeline.core.integrity import check_name, seal, verify_stage
from pipeline.sources import iter_documents
from pipeline.sources.filters import filter_unit, finish
from pipeline.sources.hf import hf_shards, shard_documents

OUT = STAGE_OUT["ingest"]
SHARD_DOCS = 5000


STDLIB_SOURCES = {"python-docs", "python-code"}   # builtin sources read from the running interpreter


def _minor(version: str) -> str:
    return ".".join(str(version).split(".")[:2])


def stdlib_patch_drift(src, locked: dict) -> bool:
    """A stdlib source locked under another patch release of the same Python minor (3.11.7 vs 3.11.9):
    its text differs a little, and that is not a reason to stop; any other change is."""
    made, here = str(locked.get("python", "")), platform.python_version()
    return (getattr(src, "kind", None) == "builtin" and getattr(src, "builtin", None) in STDLIB_SOURCES
            and made != here and _minor(made) == _minor(here))


def _write_shards(docs: list[str], out: Path) -> dict[str, str]:
    out.mkdir(parents=True)
    hashes = {}
    for i in range(0, max(len(docs), 1), SHARD_DOCS):
        name = f"shard-{i // SHARD_DOCS:05d}.jsonl"
        body = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs[i:i + SHARD_DOCS])
        (out / name).write_text(body, encoding="utf-8")
        hashes[name] = sha256_file(out / name)
    return hashes


UNIT_VERSION = 1     # bump when what a unit file holds changes: older work is then ignored


def work_dir(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.work")


def _unit_jobs(src, manifest_path: str, unit_docs: int, allow_paths=()) -> list[tuple[str, object, str]]:
    """(kind, payload, input fingerprint) per unit: fixed runs of raw documents, or hub shards."""
    if isinstance(src, HFSource):
        shards = hf_shards(src, manifest_path, allow_paths)
        return [("hf", sh, f"shard {i} of {len(shards)}") for i, sh in enumerate(shards)]
    docs = list(iter_documents(src, manifest_path, allow_paths))
    jobs = []
    for i in range(0, len(docs), unit_docs):
        chunk = docs[i:i + unit_docs]
        digest = hashlib.blake2b(digest_size=16)
        for d in chunk:
            digest.update(d.encode("utf-8", "surrogatepass") + b"\0")
        jobs.append(("docs", chunk, digest.hexdigest()))
    return jobs


def ingest_unit(filters, kind: str, payload, text_field: str = "text") -> dict:
    """One unit on any worker: its documents through the per-document filters (filter_unit)."""
    docs = shard_documents(payload, text_field) if kind == "hf" else payload
    return filter_unit(filters, docs)


def _unit_path(work: Path, src_name: str, i: int) -> Path:
    return work / src_name / f"unit-{i:05d}.json"


def _save_unit(path: Path, fingerprint: str, result: dict) -> None:
    """minhash first, the JSON last: a unit counts as done when its JSON is there."""
    if "minhash" in result:
        buf = io.BytesIO()
        np.save(buf, result["minhash"])
        atomic_write_bytes(path.with_suffix(".minhash.npy"), buf.getvalue())
    body = {k: result[k] for k in ("raw", "removed", "docs", "keys")}
    atomic_write_text(path, json.dumps({"fingerprint": fingerprint, **body}, ensure_ascii=False))


def _load_unit(path: Path, fingerprint: str, near_dedup: bool) -> dict | None:
    """A unit committed by an earlier run with the same fingerprint (None: absent or stale)."""
    try:
        unit = read_json(path)
        if unit.get("fingerprint") != fingerprint:
            return None
        if near_dedup:
            unit["minhash"] = np.load(path.with_suffix(".minhash.npy"))
        return unit
    except (OSError, ValueError):
        return None


def _fingerprint(src, i: int, n: int, input_id: str) -> str:
    return sha256_bytes(canonical_json({"source": src.model_dump(mode="json"), "unit": i, "units": n,
                                        "input": input_id, "version": UNIT_VERSION,
                                        "python": platform.python_version()}).encode())


def ingest_units(sources, manifest_path: str, work: Path, executor, unit_docs: int,
                 on_unit: Callable[[str, int, int], None] | None = None, allow_paths=()) -> dict[str, list[str]]:
    """Make sure every unit of every source is committed to the work folder: those an earlier run
    finished stay, the others run on `executor` and are committed as soon as each is back.
    `on_unit(source, i, n)` is called after each commit. Returns the fingerprints per source."""
    pending, fingerprints = [], {}
    for src in sources:
        jobs = _unit_jobs(src, manifest_path, unit_docs, allow_paths)
        fingerprints[src.name] = [_fingerprint(src, i, len(jobs), job[2]) for i, job in enumerate(jobs)]
        resumed = 0
        for i, (kind, payload, _input) in enumerate(jobs):
            fp = fingerprints[src.name][i]
            if _load_unit(_unit_path(work, src.name, i), fp, False) is not None:
                resumed += 1
            else:
                pending.append((src, i, len(jobs), fp, kind, payload))
        if resumed:
            status(f"ingest: {src.name}: resumed {resumed} of {len(jobs)} units from {work}")
    args = ((p[0].filters, p[4], p[5], getattr(p[0], "text_field", "text")) for p in pending)
    results = executor.map(ingest_unit, args)
    for src, i, n, fp, _kind, _payload in tqdm(pending, desc=f"ingest ({executor.name})", unit="unit"):
        _save_unit(_unit_path(work, src.name, i), fp, next(results))
        if on_unit is not None:
            on_unit(src.name, i, n)
    return fingerprints


def load_units(src, work: Path, fingerprints: list[str]) -> list[dict]:
    """One source's committed units, in order (one source in memory at a time)."""
    units = [_load_unit(_unit_path(work, src.name, i), fp, src.filters.near_dedup is not None)
             for i, fp in enumerate(fingerprints)]
    missing = [i for i, u in enumerate(units) if u is None]
    if missing:
        raise RuntimeError(f"{work / src.name}: unit {missing[0]} vanished while ingest ran")
    return units


def run(recipe: Recipe, update_lock: bool = False, out_dir: Path = OUT,
        on_unit: Callable[[str, int, int], None] | None = None) -> dict:
    manifest_path = recipe.data.manifest
    manifest = load_manifest(manifest_path)
    lock_file = manifest_lock_path(manifest_path)
    lock = read_json(lock_file)["sources"] if lock_file.is_file() else {}
    report = {"manifest": manifest.name, "manifest_file": manifest_path,
              "manifest_sha256": sha256_file(manifest_path), "python": platform.python_version(),
              "sources": {}}
    work = work_dir(out_dir)
    try:
        with make_executor(recipe.data) as executor:
            fingerprints = ingest_units(manifest.sources, manifest_path, work, executor,
                                        recipe.data.unit_docs, on_unit, manifest.allow_paths)
        with atomic_dir(out_dir) as tmp:
            for src in manifest.sources:
                docs, counts = finish(src, load_units(src, work, fingerprints[src.name]))
                if not docs:
                    raise DataIntegrityError(f"{manifest_path}: source {src.name!r} produced no documents "
                                             "after filters; loosen its filters or limits")
                shards = _write_shards(docs, tmp / src.name)
                content = sha256_bytes(canonical_json(shards).encode())
                report["sources"][src.name] = {
                    "kind": src.kind, "license": src.license, "weight": src.weight, "documents": len(docs),
                    "bytes": sum(len(d.encode("utf-8")) for d in docs), "shards": shards, "sha256": content,
                    **counts,
                }
                locked = lock.get(src.name)
                if recipe.data.lock and not update_lock and locked and locked["sha256"] != content:
                    if stdlib_patch_drift(src, locked):
                        # keyed to the Python minor: another 3.11.x ships a slightly different stdlib
                        report["sources"][src.name]["lock"] = {
                            "status": "differs: stdlib of another Python patch release",
                            "locked_python": locked.get("python"), "locked_sha256": locked["sha256"]}
                        status(f"warning: {lock_file}: source {src.name!r} is read from this Python's standard "
                               f"library ({platform.python_version()}), the lock from {locked.get('python')}'s: "
                               f"the content differs ({content[:16]}… vs {locked['sha256'][:16]}…). Going on "
                               f"(same Python minor); a bitwise recreation of a release needs the Python it records.")
                        continue
                    raise DataIntegrityError(
                        f"{lock_file}: source {src.name!r} changed: locked sha256 {locked['sha256'][:16]}… "
                        f"(python {locked.get('python', '?')}), ingested {content[:16]}… "
                        f"(python {platform.python_version()}). Refusing to train on different data; "
                        f"if the change is intended, run `omp ingest --recipe ... --update-lock`.")
            write_json(tmp / "ingest.json", report)
            seal(tmp, provenance("ingest", recipe, {"manifest": report["manifest_sha256"]}))
    except PipelineError:
        shutil.rmtree(work, ignore_errors=True)  # bad input: nothing partial stays behind
        raise
    shutil.rmtree(work, ignore_errors=True)
    unlocked = [n for n in report["sources"] if n not in lock]
    if update_lock:
        write_json(lock_file, {"manifest": manifest.name, "sources": {
            n: {"sha256": s["sha256"], "documents": s["documents"], "bytes": s["bytes"], "python": report["python"]}
            for n, s in report["sources"].items()}})
        status(f"wrote {lock_file}")
    elif recipe.data.lock and unlocked:
        status(f"warning: sources not locked in {lock_file}: {', '.join(unlocked)} "
              "(run `omp ingest --update-lock` to lock them)")
    return report


def read_documents(name: str, ingest_dir: Path = OUT) -> list[str]:
    """The documents of one ingested source, its shards checked against the ingest record first."""
    verify_stage(ingest_dir, under=check_name(name, "source name"))
    docs = []
    for shard in sorted((ingest_dir / name).glob("shard-*.jsonl")):
        with open(shard, encoding="utf-8") as f:
            docs.extend(json.loads(line)["text"] for line in f)
    return docs
