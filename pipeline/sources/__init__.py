"""Document sources named in a data manifest. Each yields plain-text documents in a fixed order."""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Iterator

from pipeline.core.config import BuiltinSource, HFSource, LocalSource
from pipeline.core.errors import RecipeError, reading
from pipeline.core.integrity import check_hub_id, confine
from pipeline.sources.arithmetic import training_documents
from pipeline.sources.filters import filter_unit, finish
from pipeline.sources.python_stdlib import python_code, python_docs


def iter_documents(source, manifest_path: str = "<manifest>", allow_paths=()) -> Iterator[str]:
    """Raw documents of one source, before filters and limits, in a deterministic order."""
    if isinstance(source, BuiltinSource):
        if source.builtin == "python-docs":
            return iter(python_docs())
        if source.builtin == "python-code":
            return iter(python_code())
        return iter(training_documents(source.arithmetic, seed=source.seed))
    if isinstance(source, HFSource):
        return _hf_documents(source, manifest_path, allow_paths)
    if isinstance(source, LocalSource):
        return _local_documents(source, manifest_path, allow_paths)
    raise TypeError(f"unknown source {source!r}")


def hub_or_local(repo_id: str, what: str, allow_paths=()) -> str:
    """A hub id `org/name`, or an existing local directory in hub layout confined to the project."""
    if Path(repo_id).exists():
        confine(repo_id, what, allow_paths)
        return repo_id
    return check_hub_id(repo_id, what)


def _hf_documents(source: HFSource, manifest_path: str, allow_paths=()) -> Iterator[str]:
    """A hub dataset pinned to a revision. `repo_id` may also be a local directory in hub layout
    (e.g. `data/train-00000-of-00001.parquet`), which is how it is tested offline."""
    import datasets

    hub_or_local(source.repo_id, f"{manifest_path}: sources.{source.name}.repo_id", allow_paths)


    with reading(f"{manifest_path}: sources.{source.name}.repo_id {source.repo_id}@{source.revision}",
                 "cannot load"):  # unreachable hub, unknown revision, unreadable files: one line
        ds = datasets.load_dataset(source.repo_id, name=source.config_name, revision=source.revision,
                                   split=source.split)
    if source.text_field not in ds.column_names:
        raise RecipeError(manifest_path, f"sources.{source.name}.text_field",
                          f"column {source.text_field!r} not in dataset (columns: {', '.join(ds.column_names)})")
    for i, row in enumerate(ds):
        value = row[source.text_field]
        if not isinstance(value, str):
            raise RecipeError(f"{source.repo_id}@{source.revision}", f"row {i}.{source.text_field}",
                              f"is {type(value).__name__}, not a string")
        yield value


def decode_text(data: bytes, file) -> str:
    """Strict UTF-8 text; binary files (NUL bytes) and undecodable bytes are refused naming the file."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise RecipeError(file, "", f"binary file (NUL byte at offset {nul}), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise RecipeError(file, f"line {line}", f"not UTF-8 text (byte {e.start})") from None


def _local_documents(source: LocalSource, manifest_path: str, allow_paths=()) -> Iterator[str]:
    key = f"sources.{source.name}.paths"
    files: list[str] = []
    for pattern in source.paths:
        confine(Path(pattern.split("*")[0] or "."), f"{manifest_path}: {key}", allow_paths)
        hits = sorted(glob.glob(pattern, recursive=True))
        if not hits:
            raise RecipeError(manifest_path, key, f"{pattern!r} matches no file")
        for h in hits:  # a glob or a symlink may still lead outside: check every hit
            confine(h, f"{manifest_path}: {key}", allow_paths)
        files.extend(h for h in hits if Path(h).is_file())
    for f in files:
        text = decode_text(Path(f).read_bytes(), f)
        if source.format == "text":
            yield text
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecipeError(f, f"line {lineno}", f"not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict) or source.text_field not in row:
                raise RecipeError(f, f"line {lineno}", f"no field {source.text_field!r}")
            if not isinstance(row[source.text_field], str):
                raise RecipeError(f, f"line {lineno}", f"field {source.text_field!r} is "
                                  f"{type(row[source.text_field]).__name__}, not a string")
            yield row[source.text_field]


def select_documents(source, docs: Iterator[str]) -> list[str]:
    """Apply filters, dedup, the seeded order and the max_docs / max_bytes limits (in one process;
    ingest runs the same steps unit by unit, see pipeline/sources/filters.py)."""
    return finish(source, [filter_unit(source.filters, list(docs))])[0]
