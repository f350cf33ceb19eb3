"""tokenize: each source → flat token files with document boundaries, train and held-out split.

Output `artifacts/tokenize/<source>/`: `train.npy`, `val.npy` (1-D uint16 or uint32 by vocab size;
each document followed by <|endoftext|>; open with `np.load(path, mmap_mode="r")`) and
`train_docs.npy`, `val_docs.npy` (int64 start offsets of each document, plus the end). A document
is held out when a hash of its text falls under `val_per_mille`, so the split is fixed by content,
not by order. `tokenize.json` records dtype, counts and the sha256 of every file.

Decontamination: held-out documents still share boilerplate with training ones (a module's
docstrings are in python-docs, its code in python-code; `def __exit__(self, *args)` is in every
other file), so an eval item drawn from them would overlap training. Every training window of
`decontaminate_ngram` tokens that equals an n-gram of a local eval item (pipeline.core.ngrams, the
contamination report's own definition, with this run's tokenizer) is cut out, and the document
is split there into pieces that each end with <|endoftext|>. No window of the remaining stream
equals an eval n-gram (a window across a cut holds the EOS, which no item contains), whatever
part of it training later sees. The val split is left whole.

Encoding runs in units of `UNIT_BATCHES * batch_docs` documents on the recipe's executor
(`data.executor: local | ray`, pipeline/core/executor.py); the units are written in order, so the
files are byte-identical whatever the executor or the number of workers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import tokenizer as tokmod
from pipeline.core.config import Recipe, load_manifest, recipe_path
from pipeline.core.errors import RecipeError
from pipeline.core.executor import LocalExecutor, make_executor
from pipeline.ingest import OUT as INGEST_DIR, read_documents
from pipeline.core.io import atomic_dir, sha256_file, write_json
from pipeline.core.paths import OUT as STAGE_OUT
from pipeline.core.provenance import provenance
from pipeline.core.integrity import seal, verify_stage
from pipeline.core.ngrams import covered_by, eval_texts, item_ngrams, task_files

OUT = STAGE_OUT["tokenize"]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def is_val(doc: str, per_mille: int) -> bool:
    h = hashlib.sha256(doc.encode("utf-8")).digest()
    return int.from_bytes(h[:4], "big") % 1000 < per_mille


def split_documents(docs: list[str], per_mille: int) -> tuple[list[str], list[str]]:
    train = [d for d in docs if not is_val(d, per_mille)]
    val = [d for d in docs if is_val(d, per_mille)]
    if not val and len(train) > 1:  # every source gets a held-out split, however small
        pick = min(range(len(train)), key=lambda i: hashlib.sha256(train[i].encode()).digest())
        val = [train.pop(pick)]
    return train, val


def eval_ngrams(tok, tasks_dir: Path, n: int) -> np.ndarray:
    """Sorted unique hashes of the n-grams of every local eval item, tokenized as the report does."""
    texts = eval_texts(tasks_dir)
    grams = [item_ngrams(enc.ids, n) for enc in tok.encode_batch(texts, add_special_tokens=False)]
    return np.unique(np.concatenate(grams)) if grams else np.zeros(0, np.uint64)


def keep_masks(docs_ids: list[np.ndarray], banned: np.ndarray | None, n: int, sep: int) -> list[np.ndarray | None]:
    """Per document, which tokens survive decontamination (None: all of them).

    One pass over the batch joined with `sep` (the EOS id, which no eval item contains, so no
    window across two documents can be banned) instead of one small numpy pass per document."""
    if banned is None or not docs_ids:
        return [None] * len(docs_ids)
    lens = np.array([len(x) + 1 for x in docs_ids], dtype=np.int64)
    sep_arr = np.array([sep], dtype=np.int64)
    keep = ~covered_by(np.concatenate([a for x in docs_ids for a in (x, sep_arr)]), banned, n)
    ends = np.cumsum(lens)
    return [None if keep[e - ln:e - 1].all() else keep[e - ln:e - 1] for e, ln in zip(ends, lens)]


def cut_pieces(ids: np.ndarray, keep: np.ndarray | None) -> list[np.ndarray]:
    """The runs of `ids` where `keep` is true (the whole document when `keep` is None)."""
    if keep is None:
        return [ids]
    edges = np.flatnonzero(np.diff(np.concatenate(([0], keep.astype(np.int8), [0]))))
    return [ids[a:b] for a, b in zip(edges[::2], edges[1::2])]


UNIT_BATCHES = 4  # batches of `batch_docs` documents per unit of work


_TOKENIZERS: dict[str, object] = {}


def _tokenizer(tok):
    """A Tokenizer from itself or its JSON (what Ray workers get), parsed once per process."""
    if not isinstance(tok, str):
        return tok
    from tokenizers import Tokenizer

    key = hashlib.sha256(tok.encode()).hexdigest()
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = Tokenizer.from_str(tok)
    return _TOKENIZERS[key]


def encode_unit(docs: list[str], tok, eos: int, dtype: str, batch_docs: int,
                banned: np.ndarray | None = None, n: int = 13) -> tuple[np.ndarray, np.ndarray, int, int]:
    """One unit of documents → (tokens with an EOS after each piece, piece lengths, tokens removed,
    documents cut). Batches start at the unit's start, so the bytes do not depend on where it runs."""
    tok = _tokenizer(tok)
    parts: list[np.ndarray] = []
    lengths: list[int] = []
    removed = cut_docs = 0
    for i in range(0, len(docs), batch_docs):
        encs = tok.encode_batch(docs[i:i + batch_docs], add_special_tokens=False)
        docs_ids = [np.asarray(e.ids, dtype=np.int64) for e in encs]
        for ids, keep in zip(docs_ids, keep_masks(docs_ids, banned, n, eos)):
            if keep is not None:
                removed, cut_docs = removed + int((~keep).sum()), cut_docs + 1
            for piece in cut_pieces(ids, keep):
                parts.append(np.append(piece, eos).astype(dtype))
                lengths.append(len(piece) + 1)
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
    return tokens, np.asarray(lengths, dtype=np.int64), removed, cut_docs


def encode_to_npy(tok, docs: list[str], eos: int, dtype: np.dtype, path: Path, docs_path: Path,
                  batch_docs: int, desc: str, banned: np.ndarray | None = None, n: int = 13,
                  cuts: dict | None = None, executor=None) -> tuple[int, int]:
    """Encode unit by unit on `executor` (default: this process, where the tokenizers library
    spreads each batch over all cores) and stream the ids to a raw file in unit order, then wrap it
    as .npy. Returns (tokens, documents).

    With `banned` (sorted n-gram hashes), windows equal to one are cut out (see the module
    docstring); each piece counts as a document, and `cuts` receives what was removed."""
    executor = executor or LocalExecutor()
    unit = batch_docs * UNIT_BATCHES
    # a Ray worker gets the tokenizer as JSON (shipped once); this process keeps its own object
    shared_tok = tok if isinstance(executor, LocalExecutor) else tok.to_str()
    jobs = ((docs[i:i + unit],) for i in range(0, len(docs), unit))
    raw = path.with_suffix(".raw")
    starts = [0]
    removed = cut_docs = 0
    with open(raw, "wb") as f, tqdm(total=len(docs), desc=desc, unit="doc", leave=False) as bar:
        results = executor.map(encode_unit, jobs, tok=shared_tok, eos=eos, dtype=np.dtype(dtype).str,
                               batch_docs=batch_docs, banned=banned, n=n)
        for tokens, lengths, rm, cut in results:
            f.write(tokens.tobytes())
            starts.extend((starts[-1] + np.cumsum(lengths)).tolist())
            removed, cut_docs = removed + rm, cut_docs + cut
            bar.update(min(unit, len(docs) - bar.n))
    if cuts is not None:
        cuts.update(tokens_removed=removed, documents_cut=cut_docs)
    total = starts[-1]
    with open(path, "wb") as out, open(raw, "rb") as src:
        np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                   "fortran_order": False, "shape": (total,)})
        while chunk := src.read(1 << 22):
            out.write(chunk)
    raw.unlink()
    np.save(docs_path, np.asarray(starts, dtype=np.int64))
    return total, len(starts) - 1


def decontamination_set(recipe: Recipe, tok) -> tuple[np.ndarray | None, dict]:
    """The banned n-gram hashes (None when off) and what they were built from, for tokenize.json."""
    cfg = recipe.tokenize
    if cfg.decontaminate_tasks is None:
        return None, {"enabled": False}
    tasks_dir = Path(cfg.decontaminate_tasks)
    if not tasks_dir.is_dir():
        raise RecipeError(recipe_path(recipe), "tokenize.decontaminate_tasks",
                          f"{tasks_dir} is not a directory of lm-eval task YAMLs (set it to null to "
                          "train without decontamination)")
    # the task YAMLs choose the data files, so both are inputs of the banned set
    files = sorted({str(p) for p in task_files(tasks_dir).values() if p.is_file()}
                   | {str(y) for y in tasks_dir.glob("*.yaml")}
                   | {str(m) for m in tasks_dir.glob("*.py")})   # e.g. omp_data.py, the tasks' data loader
    banned = eval_ngrams(tok, tasks_dir, cfg.decontaminate_ngram)
    return banned, {"enabled": True, "tasks_dir": str(tasks_dir), "ngram": cfg.decontaminate_ngram,
                    "eval_ngrams": int(len(banned)), "files": {f: sha256_file(Path(f)) for f in files}}


def run(recipe: Recipe, ingest_dir: Path = INGEST_DIR, tokenizer_dir: Path = tokmod.OUT,
        out_dir: Path = OUT) -> dict:
    from tokenizers import Tokenizer


    verify_stage(ingest_dir)
    verify_stage(tokenizer_dir)
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    eos = tok.token_to_id(tokmod.EOS)
    dtype = token_dtype(vocab)
    manifest = load_manifest(recipe.data.manifest)
    report = {"dtype": dtype.name, "vocab_size": vocab, "eos_id": eos,
              "tokenizer_sha256": sha256_file(tokenizer_dir / "tokenizer.json"), "sources": {}}
    banned, report["decontamination"] = decontamination_set(recipe, tok)
    n_gram = recipe.tokenize.decontaminate_ngram
    with atomic_dir(out_dir) as tmp, make_executor(recipe.data) as executor:
        for src in tqdm(manifest.sources, desc="tokenize", unit="source"):
            docs = read_documents(src.name, ingest_dir)
            train, val = split_documents(docs, recipe.tokenize.val_per_mille)
            (tmp / src.name).mkdir()
            entry = {}
            for split, part in (("train", train), ("val", val)):
                path, dpath = tmp / src.name / f"{split}.npy", tmp / src.name / f"{split}_docs.npy"
                cuts: dict = {}
                n, nd = encode_to_npy(tok, part, eos, dtype, path, dpath, recipe.tokenize.batch_docs,
                                      f"{src.name}/{split}", banned=banned if split == "train" else None,
                                      n=n_gram, cuts=cuts, executor=executor)
                entry[split] = {"file": f"{src.name}/{split}.npy", "tokens": n, "documents": nd,
                                "sha256": sha256_file(path), "docs_file": f"{src.name}/{split}_docs.npy",
                                "docs_sha256": sha256_file(dpath)}
                if split == "train" and banned is not None:
                    entry[split]["decontaminated"] = cuts
            report["sources"][src.name] = entry
        write_json(tmp / "tokenize.json", report)
        seal(tmp, provenance(
            "tokenize", recipe, {"ingest": sha256_file(ingest_dir / "ingest.json"),
                                 "tokenizer": report["tokenizer_sha256"],
                                 **report["decontamination"].get("files", {})}))
    return report
