"""Hub datasets read shard by shard (streaming), pinned to a revision.

`hf_shards` opens the dataset with `datasets.load_dataset(..., streaming=True)` at the pinned
revision and cuts it into its natural shards (one per data file); `shard_documents` reads one. The
shards in order give the rows in the dataset's own order, so each is a unit of ingest that any
worker can read, and a run that is killed resumes at the first shard it had not finished.
`repo_id` may be a local directory in hub layout (e.g. `data/train-00000-of-00004.parquet`),
which is how it is tested offline; on a Ray cluster such a directory must be on a shared disk.
"""

from __future__ import annotations

from pipeline.core.config import HFSource
from pipeline.core.errors import RecipeError, reading
from pipeline.sources import hub_or_local


def hf_shards(source: HFSource, manifest_path: str, allow_paths=()) -> list:
    """The dataset's shards, in order: picklable `datasets.IterableDataset`s of one data file each.
    `repo_id` is a hub id `org/name`, or a local directory inside the project (or allow_paths)."""
    import datasets


    hub_or_local(source.repo_id, f"{manifest_path}: sources.{source.name}.repo_id", allow_paths)
    with reading(f"{manifest_path}: sources.{source.name}.repo_id {source.repo_id}@{source.revision}",
                 "cannot load"):  # unreachable hub, unknown revision, unreadable files: one line
        ds = datasets.load_dataset(source.repo_id, name=source.config_name, revision=source.revision,
                                   split=source.split, streaming=True)
    columns = list(ds.features) if ds.features is not None else None
    if columns is not None and source.text_field not in columns:
        raise RecipeError(manifest_path, f"sources.{source.name}.text_field",
                          f"column {source.text_field!r} not in dataset (columns: {', '.join(columns)})")
    return [ds.shard(num_shards=ds.num_shards, index=i) for i in range(ds.num_shards)]


def shard_documents(shard, text_field: str) -> list[str]:
    out = []
    for i, row in enumerate(shard):
        value = row[text_field]
        if not isinstance(value, str):  # no str() of numbers, lists or None: refused by name
            raise RecipeError("hub dataset shard", f"row {i}.{text_field}",
                              f"is {type(value).__name__}, not a string")
        out.append(value)
    return out
