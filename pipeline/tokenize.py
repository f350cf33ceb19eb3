"""tokenize: each source → flat token files with document boundaries, train and held-out split.

Output `artifacts/tokenize/<source>/`: `train.npy`, `val.npy` (1-D uint16 or uint32 by vocab size;
each document followed by <|endoftext|>; open with `np.load(path, mmap_mode="r")`) and
`train_docs.npy`, `val_docs.npy` (int64 start offsets of each document, plus the end). A document
is held out when a hash of its text falls under `val_per_mille`, so the split is fixed by content,
not by order. `tokenize.json` records dtype, counts and the sha256 of every file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import tokenizer as tokmod
from pipeline.config import Recipe, load_manifest
from pipeline.ingest import OUT as INGEST_DIR, read_documents
from pipeline.io import atomic_dir, sha256_file, write_json
from pipeline.lineage import provenance

OUT = Path("artifacts/tokenize")


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


def encode_to_npy(tok, docs: list[str], eos: int, dtype: np.dtype, path: Path, docs_path: Path,
                  batch_docs: int, desc: str) -> tuple[int, int]:
    """Encode in batches (the tokenizers library spreads each batch over all cores) and stream
    the ids to a raw file, then wrap it as .npy. Returns (tokens, documents)."""
    raw = path.with_suffix(".raw")
    starts = [0]
    with open(raw, "wb") as f, tqdm(total=len(docs), desc=desc, unit="doc", leave=False) as bar:
        for i in range(0, len(docs), batch_docs):
            for enc in tok.encode_batch(docs[i:i + batch_docs], add_special_tokens=False):
                ids = np.asarray(enc.ids + [eos], dtype=dtype)
                f.write(ids.tobytes())
                starts.append(starts[-1] + len(ids))
            bar.update(min(batch_docs, len(docs) - i))
    n = starts[-1]
    with open(path, "wb") as out, open(raw, "rb") as src:
        np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                   "fortran_order": False, "shape": (n,)})
        while chunk := src.read(1 << 22):
            out.write(chunk)
    raw.unlink()
    np.save(docs_path, np.asarray(starts, dtype=np.int64))
    return n, len(starts) - 1


def run(recipe: Recipe, ingest_dir: Path = INGEST_DIR, tokenizer_dir: Path = tokmod.OUT,
        out_dir: Path = OUT) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    eos = tok.token_to_id(tokmod.EOS)
    dtype = token_dtype(vocab)
    manifest = load_manifest(recipe.data.manifest)
    report = {"dtype": dtype.name, "vocab_size": vocab, "eos_id": eos,
              "tokenizer_sha256": sha256_file(tokenizer_dir / "tokenizer.json"), "sources": {}}
    with atomic_dir(out_dir) as tmp:
        for src in tqdm(manifest.sources, desc="tokenize", unit="source"):
            docs = read_documents(src.name, ingest_dir)
            train, val = split_documents(docs, recipe.tokenize.val_per_mille)
            (tmp / src.name).mkdir()
            entry = {}
            for split, part in (("train", train), ("val", val)):
                path, dpath = tmp / src.name / f"{split}.npy", tmp / src.name / f"{split}_docs.npy"
                n, nd = encode_to_npy(tok, part, eos, dtype, path, dpath, recipe.tokenize.batch_docs,
                                      f"{src.name}/{split}")
                entry[split] = {"file": f"{src.name}/{split}.npy", "tokens": n, "documents": nd,
                                "sha256": sha256_file(path), "docs_file": f"{src.name}/{split}_docs.npy",
                                "docs_sha256": sha256_file(dpath)}
            report["sources"][src.name] = entry
        write_json(tmp / "tokenize.json", report)
        write_json(tmp / "provenance.json", provenance(
            "tokenize", recipe, {"ingest": sha256_file(ingest_dir / "ingest.json"),
                                 "tokenizer": report["tokenizer_sha256"]}))
    return report
