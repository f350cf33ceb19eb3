"""`omp`: a thin command line. Each subcommand parses arguments and calls one stage's `run`."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.errors import PipelineError

DEFAULT_RECIPE = "recipes/tiny.yaml"


def _recipe(args):
    from pipeline.config import load_recipe

    return load_recipe(args.recipe)


def cmd_ingest(args):
    from pipeline import ingest

    ingest.run(_recipe(args), update_lock=args.update_lock)


def cmd_tokenizer(args):
    from pipeline import tokenizer

    tokenizer.run(_recipe(args))


def cmd_tokenize(args):
    from pipeline import tokenize

    tokenize.run(_recipe(args))


def cmd_blend(args):
    from pipeline import blend

    report = blend.run(_recipe(args))
    print(blend.mixture_table(report))


def cmd_blend_report(args):
    from pathlib import Path

    from pipeline.blend import mixture_table
    from pipeline.io import read_json

    path = Path(args.blend_dir) / "blend.json"
    if not path.is_file():
        raise PipelineError(f"{path}: not found; run the blend stage first")
    print(mixture_table(read_json(path)))


def cmd_batch(args):
    from pipeline.data import PublishedOrder

    order = PublishedOrder(args.blend_dir, args.tokenize_dir)
    try:
        ids = order.batch(args.step)
    except IndexError as e:
        raise PipelineError(str(e)) from None
    if args.decode:
        from pipeline.tokenizer import load

        tok = load(args.tokenizer_dir)
        texts = [tok.decode(row.tolist()) for row in ids]
    if args.json:
        out = {"step": args.step, "input_ids": ids.tolist()}
        if args.decode:
            out["text"] = texts
        print(json.dumps(out))
        return
    print(f"step {args.step}: {ids.shape[0]} sequences x {ids.shape[1]} tokens")
    for r, row in enumerate(ids):
        sid, off = (int(v) for v in order.indices[args.step * order.batch_size + r])
        print(f"[{r}] {order.names[sid]} @ {off}: " + (repr(texts[r]) if args.decode else " ".join(map(str, row.tolist()))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omp", description="Open Model Pipeline")
    sub = p.add_subparsers(dest="command", required=True)

    def stage(name, fn, help_):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"recipe YAML (default {DEFAULT_RECIPE})")
        sp.set_defaults(fn=fn)
        return sp

    sp = stage("ingest", cmd_ingest, "read every source of the data manifest into artifacts/ingest/")
    sp.add_argument("--update-lock", action="store_true",
                    help="accept the ingested content and write data_manifests/<mix>.lock.json")
    stage("tokenizer", cmd_tokenizer, "train the byte-level BPE tokenizer (artifacts/tokenizer/)")
    stage("tokenize", cmd_tokenize, "tokenize every source into token files (artifacts/tokenize/)")
    stage("blend", cmd_blend, "write the published data order (artifacts/blend/indices.npy)")

    sp = sub.add_parser("batch", help="print global batch N of training from the published files")
    sp.add_argument("--step", type=int, required=True)
    sp.add_argument("--json", action="store_true", help='print {"step": N, "input_ids": [[...], ...]}')
    sp.add_argument("--decode", action="store_true", help="also decode each sequence to text")
    sp.add_argument("--blend-dir", default="artifacts/blend")
    sp.add_argument("--tokenize-dir", default="artifacts/tokenize")
    sp.add_argument("--tokenizer-dir", default="artifacts/tokenizer")
    sp.set_defaults(fn=cmd_batch)

    sp = sub.add_parser("blend-report", help="print the mixture table (target vs realized, epochs)")
    sp.add_argument("--blend-dir", default="artifacts/blend")
    sp.set_defaults(fn=cmd_blend_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
