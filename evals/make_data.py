"""Generate evals/data/*.jsonl from the builtin sources' held-out splits (byte-identical on rerun).

    python evals/make_data.py            # write evals/data/
    python evals/make_data.py --check    # exit 1 if the committed files differ from a fresh build

Held-out means: arithmetic problems for which `arithmetic.is_heldout` is true (no training
document can contain them, whatever the recipe), and python-docs / python-code documents for
which `tokenize.is_val(doc, val_per_mille)` is true under the tiny recipe (the tokenize stage
puts them in val.npy, never in train.npy). Everything is seeded by fixed strings, so the files
depend only on this script, the manifest and the Python stdlib the builtin sources read.
Held-out documents still share boilerplate with training ones (a module's docstrings, common
idioms); the tokenize stage cuts every 13-token n-gram of these items out of training
(`tokenize.decontaminate_tasks`), so the contamination report shows zero for every task.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.config import load_manifest, load_recipe  # noqa: E402
from pipeline.core.io import atomic_write_bytes  # noqa: E402
from pipeline.sources import arithmetic, iter_documents, select_documents  # noqa: E402
from pipeline.tokenize import is_val  # noqa: E402

DATA = ROOT / "evals/data"
RECIPE = ROOT / "recipes/tiny.yaml"
ARITH_PROBLEMS = 200
CHUNK_CHARS = 2000      # perplexity items: held-out documents cut at line boundaries
CODE_MC_ITEMS = 120
CODE_CONTEXT_LINES = 6
N_CHOICES = 4


def heldout_documents(source_name: str) -> list[str]:
    recipe = load_recipe(RECIPE, check_files=False)
    manifest = load_manifest(ROOT / recipe.data.manifest)
    source = manifest.source(source_name)
    docs = select_documents(source, iter_documents(source))
    return [d for d in docs if is_val(d, recipe.tokenize.val_per_mille)]


def chunk_lines(doc: str, max_chars: int) -> list[str]:
    """Cut a document at line ends into pieces of at most max_chars (a longer line is its own piece)."""
    out, cur = [], ""
    for line in doc.splitlines(keepends=True):
        if cur and len(cur) + len(line) > max_chars:
            out.append(cur)
            cur = ""
        cur += line
    if cur.strip():
        out.append(cur)
    return [c for c in out if c.strip()]


def perplexity_rows(source_name: str) -> list[dict]:
    rows = []
    for d, doc in enumerate(heldout_documents(source_name)):
        for c, text in enumerate(chunk_lines(doc, CHUNK_CHARS)):
            rows.append({"id": f"{source_name}-{d}-{c}", "text": text})
    return rows


def arithmetic_options():
    manifest = load_manifest(ROOT / load_recipe(RECIPE, check_files=False).data.manifest)
    return next(s for s in manifest.sources if getattr(s, "builtin", None) == "synthetic-arithmetic").arithmetic


def distractors(a: int, op: str, b: int, k: int) -> list[int]:
    """Plausible wrong answers: off by one or ten, or the result of another operator."""
    right = arithmetic.answer(a, op, b)
    pool = {right + 1, right - 1, right + 10, right - 10}
    pool |= {arithmetic.answer(a, o, b) for o in "+-*"}
    pool.discard(right)
    rng = random.Random(f"distractors-{a}{op}{b}")
    return rng.sample(sorted(pool), k)


def arithmetic_rows() -> list[dict]:
    rows = []
    for i, (a, op, b) in enumerate(arithmetic.heldout_problems(arithmetic_options(), ARITH_PROBLEMS)):
        right = arithmetic.answer(a, op, b)
        choices = [right] + distractors(a, op, b, N_CHOICES - 1)
        random.Random(f"order-{i}").shuffle(choices)
        rows.append({"id": f"arith-{i}", "question": arithmetic.question(a, op, b), "answer": str(right),
                     "choices": [str(c) for c in choices], "label": choices.index(right)})
    return rows


def code_mc_rows() -> list[dict]:
    """The true next line of held-out code against lines drawn from elsewhere in the held-out code.

    Every choice is "\n" + the true line's indentation + a stripped line, so indentation alone
    does not give the answer away. The context ends before that newline, not after the
    indentation: lm-eval's hf model moves trailing whitespace of a context into the continuation
    but its gguf model does not (it drops the token that straddles the boundary), so a context
    ending in whitespace would score different tokens under the two.
    """
    files = [doc.splitlines() for doc in heldout_documents("python-code")]
    candidates = [(f, i) for f, lines in enumerate(files) for i, line in enumerate(lines)
                  if i >= CODE_CONTEXT_LINES and len(line.strip()) >= 12 and not line.strip().startswith("#")]
    pool = sorted({lines[i].strip() for f, i in candidates for lines in [files[f]]})
    rng = random.Random("code-mc")
    rows = []
    for n, (f, i) in enumerate(sorted(rng.sample(candidates, min(CODE_MC_ITEMS, len(candidates))))):
        lines, true = files[f], files[f][i]
        indent = true[: len(true) - len(true.lstrip())]
        context = "\n".join(lines[i - CODE_CONTEXT_LINES:i])
        wrong = rng.sample([p for p in pool if p != true.strip()], N_CHOICES - 1)
        choices = [true.strip()] + wrong
        rng.shuffle(choices)
        rows.append({"id": f"code-{n}", "context": context, "choices": ["\n" + indent + c for c in choices],
                     "label": choices.index(true.strip())})
    return rows


def build() -> dict[str, bytes]:
    files = {
        "ppl_python_docs.jsonl": perplexity_rows("python-docs"),
        "ppl_python_code.jsonl": perplexity_rows("python-code"),
        "arithmetic.jsonl": arithmetic_rows(),
        "code_mc.jsonl": code_mc_rows(),
    }
    return {name: "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode()
            for name, rows in files.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare with evals/data/ instead of writing")
    p.add_argument("--out", type=Path, default=DATA)
    args = p.parse_args(argv)
    built = build()
    if args.check:
        bad = [n for n, b in built.items() if not (args.out / n).is_file() or (args.out / n).read_bytes() != b]
        for n in bad:
            print(f"{args.out / n}: differs from a fresh build (run python evals/make_data.py)")
        return 1 if bad else 0
    for name, data in built.items():
        atomic_write_bytes(args.out / name, data)
        items = data.count(b"\n")
        print(f"{args.out / name}: {items} items, {len(data)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
