"""`omp`: a thin command line. Each subcommand parses arguments and calls one stage's `run`.

Each `cmd_*` imports its own stage or command module when it runs, not here: `omp --help` and the
light commands load no torch, `omp <stage>` loads no other stage's code (its dvc.yaml deps are its
own import closure, tools/dvc_deps.py), and torch is imported only after `enter_numerics` has pinned
the CPU numerics. Those imports carry the comment `# per command`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pipeline
from pipeline.core import numerics
from pipeline.core.config import load_recipe
from pipeline.core.errors import PipelineError, one_line
from pipeline.core.io import read_json, write_json
from pipeline.core.lock import output_lock
from pipeline.core.log import status
from pipeline.core.paths import OUT, TIMINGS

DEFAULT_RECIPE = "recipes/tiny.yaml"


def _recipe(args):
    return load_recipe(args.recipe)


def cmd_ingest(args):
    from pipeline import ingest   # per command

    ingest.run(_recipe(args), update_lock=args.update_lock)


def cmd_tokenizer(args):
    from pipeline import tokenizer   # per command

    tokenizer.run(_recipe(args))


def cmd_tokenize(args):
    from pipeline import tokenize   # per command

    tokenize.run(_recipe(args))


def cmd_blend(args):
    from pipeline import blend   # per command

    report = blend.run(_recipe(args))
    print(blend.mixture_table(report))


def cmd_pretrain(args):
    from pipeline import pretrain   # per command
    from pipeline.core.checkpoint import ACCEPT   # per command

    ids = None
    if args.replica_ids is not None:
        try:
            ids = sorted({int(x) for x in args.replica_ids.split(",")})
        except ValueError:
            raise SystemExit(f"omp pretrain: --replica-ids {args.replica_ids!r}: expected integers like 0,1") from None
    m = pretrain.run(_recipe(args), resume=args.resume + (ACCEPT if args.accept_mismatch else ""),
                     node_rank=args.node_rank, replica_ids=ids, lighthouse=args.lighthouse, stop_at=args.stop_at)
    if "stopped_at" in m:
        print(f"stopped after step {m['stopped_at']} (--stop-at); ladder rungs written: {m.get('rungs')}")
        return
    if "val_loss_final" not in m:   # this host runs no rank 0 / replica 0: the outputs are written elsewhere
        print(m.get("message", "this node's workers finished; rank 0 writes the outputs"))
        return
    print(f"held-out loss {m['val_loss_initial']:.3f} -> {m['val_loss_final']:.3f}; "
          f"{m['tokens']:,} tokens at {m.get('tokens_per_s') or 0:,.0f} tokens/s")


def cmd_posttrain(args):
    from pipeline import posttrain   # per command

    m = posttrain.run(_recipe(args))
    print(f"arithmetic exact match (held-out): before {m['arith_em_before']:.3f} -> after {m['arith_em_after']:.3f}")


def cmd_quantize(args):
    from pipeline import quantize   # per command

    print(quantize.report_markdown(quantize.run(_recipe(args))))


def cmd_evaluate(args):
    from pipeline import evaluate   # per command

    evaluate.run(_recipe(args))


def cmd_leaderboard(args):
    from pipeline.core import leaderboard   # per command

    if args.experiments:
        results = leaderboard.gather_experiments(Path("."))
    elif args.dirs:
        results = leaderboard.gather_dirs([(Path(d).name if ":" not in d else d.split(":", 1)[0],
                                            Path(d.split(":", 1)[-1])) for d in args.dirs])
    else:
        results = leaderboard.load_results(Path(args.evaluate_dir) / "results")
    if not results:
        raise PipelineError("no evaluate results found")
    baseline = args.baseline or ("pretrain" if not args.experiments else
                                 "workspace/pretrain" if "workspace/pretrain" in results else "HEAD/pretrain")
    print(leaderboard.markdown(results, baseline=baseline))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        leaderboard.write(out, results, None, None, baseline=baseline)
        status(f"wrote {out}/leaderboard.md, .html, .png")


def cmd_blend_report(args):
    from pipeline.blend import mixture_table   # per command

    path = Path(args.blend_dir) / "blend.json"
    if not path.is_file():
        raise PipelineError(f"{path}: not found; run the blend stage first")
    print(mixture_table(read_json(path)))


def cmd_batch(args):
    from pipeline.core.order import PublishedOrder   # per command

    order = PublishedOrder(args.blend_dir, args.tokenize_dir)
    try:
        ids = order.batch(args.step)
    except IndexError as e:
        raise PipelineError(str(e)) from None
    if args.decode:
        from pipeline.tokenizer import load   # per command

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


def cmd_release(args):
    from pipeline import release   # per command

    release.run(_recipe(args))


def cmd_publish(args):
    from pipeline.commands import publish   # per command

    publish.run(args.release_dir, args.repo_id, private=args.private)


def cmd_recreate(args):
    from pipeline.commands import recreate   # per command

    code = recreate.run(args.target, until=args.until, workdir=args.workdir, tolerance=args.tolerance,
                        allow_outside=args.allow_outside, step=args.step)
    if code:
        raise SystemExit(code)


def cmd_verify(args):
    from pipeline.commands import verify   # per command

    code = verify.verify(args.target, check_init=not args.no_init)
    if code:
        raise SystemExit(code)


def cmd_lighthouse(args):
    from pipeline.pretrain import ft   # per command

    ft.serve_lighthouse(args.port, args.min_replicas, args.join_timeout_ms, args.heartbeat_timeout_ms,
                        args.address_file)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omp", description="Open Model Pipeline: raw data to a recreatable model "
                                "release. Results go to stdout, status messages to stderr.")
    p.add_argument("--version", action="version", version=f"omp {pipeline.__version__}",
                   help="print the version and exit")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    def stage(name, fn, help_):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"recipe YAML (default {DEFAULT_RECIPE})")
        # one writer per stage output: a second run refuses, naming the holder's pid (pipeline.core.lock)
        sp.set_defaults(fn=fn, lock=str(OUT[name]))
        return sp

    sp = stage("ingest", cmd_ingest, "read every source of the data manifest into artifacts/ingest/")
    sp.add_argument("--update-lock", action="store_true",
                    help="accept the ingested content and write data_manifests/<mix>.lock.json")
    stage("tokenizer", cmd_tokenizer, "train the byte-level BPE tokenizer (artifacts/tokenizer/)")
    stage("tokenize", cmd_tokenize, "tokenize every source into token files (artifacts/tokenize/)")
    stage("blend", cmd_blend, "write the published data order (artifacts/blend/indices.npy)")
    sp = stage("pretrain", cmd_pretrain, "train the Llama model on the published order (artifacts/pretrain/)")
    sp.add_argument("--resume", default="none", metavar="none|latest|latest-valid|DIR",
                    help="continue from a checkpoint under artifacts/pretrain/checkpoints (default: start fresh)")
    sp.add_argument("--node-rank", type=int, default=None,
                    help="pin this machine's torchrun node rank (nodes.nnodes > 1; default: the rendezvous assigns it)")
    sp.add_argument("--replica-ids", default=None, metavar="I,J,...",
                    help="engine torchft: the replica groups this host runs (default: 0..world_size-1)")
    sp.add_argument("--lighthouse", default=None, metavar="http://HOST:PORT",
                    help="engine torchft: the Lighthouse of the job (default: pretrain.distributed.torchft."
                         "lighthouse, $TORCHFT_LIGHTHOUSE, or one started here)")
    sp.add_argument("--accept-mismatch", action="store_true",
                    help="resume even if the checkpoint was made with another recipe or data order "
                         "(both are recorded in the lineage as resume_mismatch)")
    sp.add_argument("--stop-at", type=int, default=None, metavar="N",
                    help="stop after step N with the ladder rungs up to N written, nothing else "
                         "(what `omp recreate --step N` runs; the schedule stays the whole run's)")
    stage("posttrain", cmd_posttrain, "SFT (+ DPO) from the pretrained model (artifacts/posttrain/)")
    stage("quantize", cmd_quantize, "int8/int4 variants, GGUF files and the perplexity report (artifacts/quantize/)")

    stage("evaluate", cmd_evaluate, "lm-eval on every model variant, leaderboard (artifacts/evaluate/)")

    sp = sub.add_parser("lighthouse", help="run a torchft Lighthouse for `pretrain.distributed.engine: torchft` "
                                            "replicas on several hosts (until SIGTERM / Ctrl-C)")
    sp.add_argument("--port", type=int, default=29510, help="TCP port on every interface (default 29510; 0: any free)")
    sp.add_argument("--min-replicas", type=int, default=1, help="replica groups a quorum needs (default 1)")
    sp.add_argument("--join-timeout-ms", type=int, default=2000, help="wait this long for more replicas to join")
    sp.add_argument("--heartbeat-timeout-ms", type=int, default=2000,
                    help="a replica silent this long leaves the quorum")
    sp.add_argument("--address-file", type=Path, default=None, help="also write the address here")
    sp.set_defaults(fn=cmd_lighthouse)

    sp = sub.add_parser("leaderboard", help="variants x tasks table from evaluate results, across experiments")
    sp.add_argument("--evaluate-dir", default=str(OUT["evaluate"]),
                    help="evaluate output whose results/*.json are tabled (default artifacts/evaluate)")
    sp.add_argument("--dirs", nargs="+", metavar="[LABEL:]DIR", help="several evaluate output dirs side by side")
    sp.add_argument("--experiments", action="store_true",
                    help="gather the workspace's, HEAD's and every DVC experiment's evaluate metrics")
    sp.add_argument("--baseline", help="variant the deltas are taken against (default pretrain; "
                                       "with --experiments workspace/pretrain, else HEAD/pretrain)")
    sp.add_argument("--out", help="also write leaderboard.md/.html/.png into this directory")
    sp.set_defaults(fn=cmd_leaderboard)

    sp = sub.add_parser("batch", help="print global batch N of training from the published files")
    sp.add_argument("--step", type=int, required=True, help="training step (0-based) whose global batch to print")
    sp.add_argument("--json", action="store_true", help='print {"step": N, "input_ids": [[...], ...]}')
    sp.add_argument("--decode", action="store_true", help="also decode each sequence to text")
    sp.add_argument("--blend-dir", default=str(OUT["blend"]), help="published order (default artifacts/blend)")
    sp.add_argument("--tokenize-dir", default=str(OUT["tokenize"]), help="token files (default artifacts/tokenize)")
    sp.add_argument("--tokenizer-dir", default=str(OUT["tokenizer"]),
                    help="tokenizer used by --decode (default artifacts/tokenizer)")
    sp.set_defaults(fn=cmd_batch)

    stage("release", cmd_release, "assemble the Hugging Face release (artifacts/release/<name>/)")
    sp = sub.add_parser("publish", help="upload a release to the Hugging Face Hub (dry run without token/network)")
    sp.add_argument("release_dir", type=Path, help="a release made by `omp release` (artifacts/release/<name>)")
    sp.add_argument("--repo-id", default=None, help="org/name (default: release.repo_id of the recipe)")
    sp.add_argument("--private", action="store_true", help="create the hub repository as private")
    sp.set_defaults(fn=cmd_publish)
    sp = sub.add_parser("recreate", help="rebuild a release's chain from its lineage and compare every tensor")
    sp.add_argument("target", type=Path, help="release directory or its lineage.json")
    sp.add_argument("--until", choices=["pretrain", "posttrain", "quantize"], default=None,
                    help="last stage to rebuild and compare (default: the released variant's stage)")
    sp.add_argument("--workdir", type=Path, default=None, help="where to rebuild (default: a new temp dir)")
    sp.add_argument("--tolerance", type=float, default=0.0, help="max abs diff accepted (0: bitwise)")
    sp.add_argument("--step", type=int, default=None, metavar="N",
                    help="recreate only the ladder rung checkpoints/step-N: train up to step N, compare that rung")
    sp.add_argument("--allow-outside", action="store_true",
                    help="run a lineage whose recipe/manifest lists allow_paths outside the work folder")
    sp.set_defaults(fn=cmd_recreate)

    sp = sub.add_parser("verify", help="check a release's files and checkpoint ladder against its lineage")
    sp.add_argument("target", help="release directory, or a hub repo id (org/name) whose branches hold the rungs")
    sp.add_argument("--no-init", action="store_true",
                    help="do not rebuild the seed's initialization to check the ladder's first parent")
    sp.set_defaults(fn=cmd_verify)

    sp = sub.add_parser("blend-report", help="print the mixture table (target vs realized, epochs)")
    sp.add_argument("--blend-dir", default=str(OUT["blend"]), help="blend output with blend.json (default artifacts/blend)")
    sp.set_defaults(fn=cmd_blend_report)
    return p


def describe(exc: BaseException) -> str:
    """One line for any error: the pipeline's own name the file and key; others get the file they
    carry (OSError) or the place in the code they came from (run with --debug for the traceback)."""
    if isinstance(exc, PipelineError):
        return " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or one_line(exc)}"
    where = ""
    tb = exc.__traceback__
    while tb is not None:
        if "/pipeline/" in tb.tb_frame.f_code.co_filename:
            where = f" (in {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}, {tb.tb_frame.f_code.co_name})"
        tb = tb.tb_next
    return f"{one_line(exc)}{where}; run with --debug for the traceback"


TORCH_STAGES = ("pretrain", "posttrain", "quantize", "evaluate")


def enter_numerics(args) -> None:
    """Pin the recipe's CPU numerics (pipeline/core/numerics.py) before anything imports torch; every
    process the stage starts inherits them. Stages that never compute with torch (the data stages,
    the release) pin nothing; `omp verify` (it rebuilds the seed's initialization) pins the default
    profile where the environment is silent; `omp recreate` enters the profile the lineage records."""
    if getattr(args, "recipe", None) is not None and args.command in TORCH_STAGES:
        numerics.enter_recipe(_recipe(args), args.command, where=f"{args.recipe}: platform.numerics")
    elif args.command == "verify" and numerics.PROFILE_VAR not in os.environ:
        for k, v in numerics.pinned_env("portable", 2).items():
            os.environ.setdefault(k, v)


def write_machine(stage: str) -> None:
    """The CPU and the numerics this stage ran with, for information, apart from every hashed output
    (as the timings: artifacts/timings/machine-<stage>.json), so equal runs still write equal files."""
    rec = {"stage": stage, **numerics.machine()}
    if "torch" in sys.modules:
        rec["numerics"] = numerics.in_force()
    path = TIMINGS / f"machine-{stage}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, rec)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted before or after the subcommand
    args = build_parser().parse_args(argv)
    if args.command == "pretrain" and args.replica_ids is not None and \
            "0" not in [x.strip() for x in args.replica_ids.split(",")]:
        args.lock = None   # torchft replicas joining a job whose replica 0 (and outputs) run elsewhere
    if args.command == "pretrain" and args.node_rank:
        args.lock = None   # another node of this torchrun job (node 0 holds the lock on a shared folder)
    try:
        enter_numerics(args)
        if getattr(args, "lock", None):
            with output_lock(args.lock, command=f"omp {args.command}"):
                args.fn(args)
            if args.command in TORCH_STAGES:
                write_machine(args.command)
        else:
            args.fn(args)
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error becomes one line and exit 2 (--debug: traceback)
        if debug:
            raise
        print(f"error: {describe(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
