"""Bad recipes and manifests: a clear one-line error naming file and key, and nothing written."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pipeline.core.config import load_recipe, recipe_sha256
from pipeline.core.errors import RecipeError
from pipeline.core.io import sha256_tree
from tests.conftest import MICRO, REPO, make_workdir, omp

GOOD_MANIFEST = (REPO / "tests/recipes/micro_manifest.yaml").read_text()


def _recipe(body: str) -> str:
    return textwrap.dedent(body).strip() + "\n"


# (name, recipe text, manifest text or None for the good one, key path expected in the message)
CASES = [
    ("unknown-top-key", "name: x\nbogus: 1\n", None, "bogus: unknown key"),
    ("unknown-nested-key", "name: x\nblend:\n  seqlen: 64\n", None, "blend.seqlen: unknown key"),
    ("wrong-type", "name: x\nblend:\n  seq_len: long\n", None, "blend.seq_len"),
    ("zero-batch", "name: x\nblend:\n  global_batch_size: 0\n", None, "blend.global_batch_size"),
    ("negative-tokens", "name: x\nblend:\n  tokens: -5\n", None, "blend.tokens"),
    ("tiny-vocab", "name: x\ntokenizer:\n  vocab_size: 10\n", None, "tokenizer.vocab_size"),
    ("topk-chunk-alone", "name: x\npretrain:\n  distributed:\n    mode: diloco\n    diloco: {compression: {kind: int2, topk_chunk: 64}}\n",
     None, "pretrain.distributed.diloco.compression: Value error, topk_chunk needs topk_fraction"),
    ("missing-name", "seed: 3\n", None, "name: Field required"),
    ("missing-manifest", "name: x\ndata:\n  manifest: data_manifests/nope.yaml\n", None, "data.manifest"),
    ("yaml-syntax", "name: x\nblend: [unclosed\n", None, "not valid YAML"),
    ("weight-zero", None, GOOD_MANIFEST.replace("weight: 0.5", "weight: 0"), "sources.0.weight"),
    ("weight-negative", None, GOOD_MANIFEST.replace("weight: 0.3", "weight: -0.3"), "sources.1.weight"),
    ("unknown-kind", None, GOOD_MANIFEST.replace("kind: builtin\n    builtin: python-code", "kind: ftp\n    builtin: python-code"),
     "sources.1"),
    ("unknown-source-key", None, GOOD_MANIFEST.replace("license: CC0-1.0", "license: CC0-1.0\n    colour: red"),
     "sources.2.colour: unknown key"),
    ("duplicate-sources", None, GOOD_MANIFEST.replace("name: python-code", "name: python-docs"), "duplicate source names"),
    ("hf-without-revision", None, "name: m\nsources:\n  - {name: web, kind: hf, repo_id: org/ds, license: mit, weight: 1}\n",
     "sources.0.revision: Field required"),
    ("no-license", None, GOOD_MANIFEST.replace("    license: CC0-1.0\n", ""), "sources.2.license: Field required"),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = make_workdir(tmp_path_factory.mktemp("bad"))
    # an existing artifact that a failed run must leave untouched
    (wd / "artifacts/ingest").mkdir(parents=True)
    (wd / "artifacts/ingest/ingest.json").write_text('{"sentinel": true}\n')
    return wd


@pytest.mark.parametrize("name,recipe,manifest,key", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_writes_nothing(workdir, name, recipe, manifest, key):
    rfile = workdir / f"bad-{name}.yaml"
    if manifest is not None:
        mfile = workdir / f"bad-{name}-manifest.yaml"
        mfile.write_text(manifest)
        recipe = f"name: x\ndata:\n  manifest: {mfile.name}\n"
        expected_file = mfile.name
    else:
        expected_file = rfile.name
    rfile.write_text(recipe)
    before = sha256_tree(workdir / "artifacts")
    proc = omp("ingest", "--recipe", rfile.name, cwd=workdir, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and expected_file in lines[0] and key in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert sha256_tree(workdir / "artifacts") == before
    assert not [p for p in (workdir / "artifacts").iterdir() if p.name.startswith(".")]


def test_budget_below_one_batch_is_refused_before_writing(micro_data, copy_workdir):
    wd = copy_workdir(micro_data)
    (wd / "small.yaml").write_text(f"base: {MICRO}\nname: small\nblend:\n  tokens: 100\n")
    # base paths are relative to the recipe file, which sits in the workdir root
    before = sha256_tree(wd / "artifacts/blend")
    proc = omp("blend", "--recipe", "small.yaml", cwd=wd, check=False)
    assert proc.returncode == 2
    assert "small.yaml: blend.tokens" in proc.stderr
    assert sha256_tree(wd / "artifacts/blend") == before


def test_base_recipe_merges_and_cycles_are_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\nseed: 1\nblend:\n  seq_len: 32\n  tokens: 5000\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nname: b\nblend:\n  seq_len: 16\n")
    r = load_recipe(tmp_path / "b.yaml", check_files=False)
    assert (r.name, r.seed, r.blend.seq_len, r.blend.tokens) == ("b", 1, 16, 5000)
    assert recipe_sha256(r) != recipe_sha256(load_recipe(tmp_path / "a.yaml", check_files=False))
    (tmp_path / "c.yaml").write_text("base: d.yaml\nname: c\n")
    (tmp_path / "d.yaml").write_text("base: c.yaml\nname: d\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "c.yaml", check_files=False)


def test_recipe_hash_ignores_layout(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\nblend: {seq_len: 32}\n")
    (tmp_path / "b.yaml").write_text("# same recipe, other layout\nblend:\n    seq_len: 32\nname: a\n")
    ha = recipe_sha256(load_recipe(tmp_path / "a.yaml", check_files=False))
    assert ha == recipe_sha256(load_recipe(tmp_path / "b.yaml", check_files=False))


def test_shipped_recipes_validate():
    for path in sorted((REPO / "recipes").glob("*.yaml")) + [REPO / MICRO]:
        import os
        cwd = os.getcwd()
        os.chdir(REPO)
        try:
            load_recipe(path.relative_to(REPO))
        finally:
            os.chdir(cwd)


def test_engine_and_mode_rules_are_checked_when_the_recipe_loads():
    """Every engine/mode rule lives in the recipe models: a bad pairing fails at load, naming the key."""
    from pydantic import ValidationError

    from pipeline.core.config import Recipe

    def load(pretrain):
        return Recipe.model_validate({"name": "t", "pretrain": pretrain})

    with pytest.raises(ValidationError, match="engine deepspeed trains data parallel only"):
        load({"distributed": {"engine": "deepspeed", "mode": "diloco"}})
    with pytest.raises(ValidationError, match="compile: not supported with engine deepspeed"):
        load({"compile": True, "distributed": {"engine": "deepspeed"}})
    with pytest.raises(ValidationError, match="engine torchft trains DiLoCo rounds"):
        load({"distributed": {"engine": "torchft", "mode": "ddp"}})
    assert load({"distributed": {"engine": "deepspeed", "zero_stage": 3}}).pretrain.distributed.zero_stage == 3
