"""The command line a new user meets: a version, help on every argument, results on stdout."""

from __future__ import annotations

import argparse

import pipeline
from pipeline.cli import build_parser, main


def _all_parsers(p: argparse.ArgumentParser):
    yield "omp", p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"omp {name}", sub


def test_version_prints_the_package_version(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out.strip() == f"omp {pipeline.__version__}"


def test_every_subcommand_and_argument_has_help():
    parser = build_parser()
    missing = []
    names = []
    for prog, p in _all_parsers(parser):
        names.append(prog)
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not (a.help and a.help.strip()):
                missing.append(f"{prog} {'/'.join(a.option_strings) or a.dest}")
    assert "omp release" in names and "omp leaderboard" in names and len(names) >= 15
    assert not missing, f"arguments without help: {missing}"
