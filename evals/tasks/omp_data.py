"""Data loader of the local lm-eval tasks: `dataset_kwargs.data_files` are relative to this folder.

lm-eval hands `dataset_kwargs` to `datasets.load_dataset`, which resolves relative paths against the
current directory; the task YAMLs name this function as `custom_dataset` instead, so
`lm_eval --include_path /anywhere/evals/tasks` finds `evals/data/` from any working directory.
(lm-eval calls it with the task's metadata as extra keyword arguments: they are ignored.)
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(data_files=None, **_ignored):
    import datasets

    if not isinstance(data_files, dict) or not data_files:
        raise ValueError(f"{HERE}: task needs dataset_kwargs.data_files {{split: path}}")
    files = {split: str(HERE / p) for split, p in data_files.items()}
    for split, f in files.items():
        if not Path(f).is_file():
            raise FileNotFoundError(f"{f}: data file of split {split!r} not found (paths are relative to {HERE})")
    return datasets.load_dataset("json", data_files=files)
