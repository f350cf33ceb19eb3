"""Document sources named in a data manifest. Each yields plain-text documents in a fixed order."""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Iterator

from pipeline.config import BuiltinSource, HFSource, LocalSource
from pipeline.errors import RecipeError


def iter_documents(source, manifest_path: str = "<manifest>") -> Iterator[str]:
    """Raw documents of one source, before filters and limits, in a deterministic order."""
    if isinstance(source, BuiltinSource):
        if source.builtin == "python-docs":
            from pipeline.sources.python_stdlib import python_docs
            return iter(python_docs())
        if source.builtin == "python-code":
            from pipeline.sources.python_stdlib import python_code
            return iter(python_code())
        from pipeline.sources.arithmetic import training_documents
        return iter(training_documents(source.arithmetic, seed=source.seed))
    if isinstance(source, HFSource):
        return _hf_documents(source, manifest_path)
    if isinstance(source, LocalSource):
        return _local_documents(source, manifest_path)
    raise TypeError(f"unknown source {source!r}")


def _hf_documents(source: HFSource, manifest_path: str) -> Iterator[str]:
    """A hub dataset pinned to a revision. `repo_id` may also be a local directory in hub layout
    (e.g. `data/train-00000-of-00001.parquet`), which is how it is tested offline."""
    import datasets

    ds = datasets.load_dataset(source.repo_id, name=source.config_name, revision=source.revision,
                               split=source.split)
    if source.text_field not in ds.column_names:
        raise RecipeError(manifest_path, f"sources.{source.name}.text_field",
                          f"column {source.text_field!r} not in dataset (columns: {', '.join(ds.column_names)})")
    for row in ds:
        yield str(row[source.text_field])


def _local_documents(source: LocalSource, manifest_path: str) -> Iterator[str]:
    files: list[str] = []
    for pattern in source.paths:
        hits = sorted(glob.glob(pattern, recursive=True))
        if not hits:
            raise RecipeError(manifest_path, f"sources.{source.name}.paths", f"{pattern!r} matches no file")
        files.extend(h for h in hits if Path(h).is_file())
    for f in files:
        if source.format == "text":
            yield Path(f).read_text(encoding="utf-8", errors="replace")
        else:
            with open(f, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    if source.text_field not in row:
                        raise RecipeError(f, f"line {lineno}", f"no field {source.text_field!r}")
                    yield str(row[source.text_field])


def select_documents(source, docs: Iterator[str]) -> list[str]:
    """Apply filters, dedup, the seeded order and the max_docs / max_bytes limits (in one process;
    ingest runs the same steps unit by unit, see pipeline/sources/filters.py)."""
    from pipeline.sources.filters import filter_unit, finish

    return finish(source, [filter_unit(source.filters, list(docs))])[0]
