"""ingest: every source of the data manifest → sharded JSONL documents + sha256 per shard.

Output `artifacts/ingest/`: `<source>/shard-00000.jsonl` ({"text": ...} per line), `ingest.json`
(per source: kind, license, documents, bytes, shard hashes, and one content sha256), and
`provenance.json`. With `data.lock: true` the content sha256 of each source is checked against
`data_manifests/<mix>.lock.json`; a mismatch stops the stage naming the source (training data
never changes silently). `omp ingest --update-lock` writes that lock file.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from tqdm import tqdm

from pipeline.config import Recipe, load_manifest
from pipeline.errors import DataIntegrityError
from pipeline.io import atomic_dir, canonical_json, read_json, sha256_bytes, sha256_file, write_json
from pipeline.lineage import provenance
from pipeline.verify import seal
from pipeline.sources import iter_documents, select_documents

OUT = Path("artifacts/ingest")
SHARD_DOCS = 5000


def lock_path(manifest_path: str | Path) -> Path:
    p = Path(manifest_path)
    return p.with_name(p.stem + ".lock.json")


def _write_shards(docs: list[str], out: Path) -> dict[str, str]:
    out.mkdir(parents=True)
    hashes = {}
    for i in range(0, max(len(docs), 1), SHARD_DOCS):
        name = f"shard-{i // SHARD_DOCS:05d}.jsonl"
        body = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs[i:i + SHARD_DOCS])
        (out / name).write_text(body, encoding="utf-8")
        hashes[name] = sha256_file(out / name)
    return hashes


def run(recipe: Recipe, update_lock: bool = False, out_dir: Path = OUT) -> dict:
    manifest_path = recipe.data.manifest
    manifest = load_manifest(manifest_path)
    lock_file = lock_path(manifest_path)
    lock = read_json(lock_file)["sources"] if lock_file.is_file() else {}
    report = {"manifest": manifest.name, "manifest_file": manifest_path,
              "manifest_sha256": sha256_file(manifest_path), "python": platform.python_version(),
              "sources": {}}
    with atomic_dir(out_dir) as tmp:
        for src in tqdm(manifest.sources, desc="ingest", unit="source"):
            docs = select_documents(src, iter_documents(src, manifest_path, manifest.allow_paths))
            if not docs:
                raise DataIntegrityError(f"{manifest_path}: source {src.name!r} produced no documents "
                                         "after filters; loosen its filters or limits")
            shards = _write_shards(docs, tmp / src.name)
            content = sha256_bytes(canonical_json(shards).encode())
            report["sources"][src.name] = {
                "kind": src.kind, "license": src.license, "weight": src.weight, "documents": len(docs),
                "bytes": sum(len(d.encode("utf-8")) for d in docs), "shards": shards, "sha256": content,
            }
            locked = lock.get(src.name)
            if recipe.data.lock and not update_lock and locked and locked["sha256"] != content:
                raise DataIntegrityError(
                    f"{lock_file}: source {src.name!r} changed: locked sha256 {locked['sha256'][:16]}… "
                    f"(python {locked.get('python', '?')}), ingested {content[:16]}… "
                    f"(python {platform.python_version()}). Refusing to train on different data; "
                    f"if the change is intended, run `omp ingest --recipe ... --update-lock`.")
        write_json(tmp / "ingest.json", report)
        seal(tmp, provenance("ingest", recipe, {"manifest": report["manifest_sha256"]}))
    unlocked = [n for n in report["sources"] if n not in lock]
    if update_lock:
        write_json(lock_file, {"manifest": manifest.name, "sources": {
            n: {"sha256": s["sha256"], "documents": s["documents"], "bytes": s["bytes"], "python": report["python"]}
            for n, s in report["sources"].items()}})
        print(f"wrote {lock_file}")
    elif recipe.data.lock and unlocked:
        print(f"warning: sources not locked in {lock_file}: {', '.join(unlocked)} "
              "(run `omp ingest --update-lock` to lock them)")
    return report


def read_documents(name: str, ingest_dir: Path = OUT) -> list[str]:
    """The documents of one ingested source, its shards checked against the ingest record first."""
    from pipeline.verify import check_name, verify_stage

    verify_stage(ingest_dir, under=check_name(name, "source name"))
    docs = []
    for shard in sorted((ingest_dir / name).glob("shard-*.jsonl")):
        with open(shard, encoding="utf-8") as f:
            docs.extend(json.loads(line)["text"] for line in f)
    return docs
