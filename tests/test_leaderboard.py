"""The leaderboard renders from lm-eval results files; the arena fits Bradley-Terry correctly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import leaderboard
from pipeline.evaluate import arena
from tests.conftest import REPO, omp

sys.path.insert(0, str(REPO / "evals"))
import screenshot_leaderboard as shot  # noqa: E402


def lm_eval_result(bpb: float, acc: float) -> dict:
    """The parts of lm-eval's results JSON the leaderboard reads (its real key layout)."""
    return {"results": {"omp_ppl_python_docs": {"alias": "omp_ppl_python_docs", "bits_per_byte,none": bpb,
                                                "bits_per_byte_stderr,none": "N/A", "byte_perplexity,none": 2 ** bpb},
                        "omp_arith_mc": {"alias": "omp_arith_mc", "acc,none": acc, "acc_stderr,none": 0.01}},
            "versions": {"omp_ppl_python_docs": 1.0, "omp_arith_mc": 1.0}}


RESULTS = {"pretrain": lm_eval_result(2.0, 0.30), "posttrain": lm_eval_result(2.1, 0.55),
           "quant-int4-rtn": lm_eval_result(2.5, 0.40)}


def test_markdown_has_values_and_deltas_against_pretrain():
    md = leaderboard.markdown(RESULTS)
    row = next(line for line in md.splitlines() if line.startswith("| posttrain |"))
    # columns sorted by task name: omp_arith_mc then omp_ppl_python_docs; bpb up is worse (▼)
    assert row == "| posttrain | 0.550 (+0.250 ▲) | 2.1000 (+0.100 ▼) |"
    assert "| pretrain | 0.300 | 2.0000 |" in md


def test_flat_metrics_keep_numbers_only():
    flat = leaderboard.flat_metrics(RESULTS)
    assert flat["posttrain"]["omp_ppl_python_docs"] == {"bits_per_byte": 2.1, "byte_perplexity": 2 ** 2.1}


def test_html_table_and_png_are_written(tmp_path):
    ratings = arena.ratings({"pretrain": {"t": {"0": 1.0, "1": 1.0}}, "posttrain": {"t": {"0": 0.0, "1": 1.0}}},
                            rounds=20)
    leaderboard.write(tmp_path, RESULTS, ratings, None)
    page = (tmp_path / "leaderboard.html").read_text()
    assert page.count("<tr>") == 1 + 3 + 1 + 2  # task header + 3 variants, arena header + 2
    assert "class='sortable'" in page and "data-v=\"0.55\"" in page
    assert (tmp_path / "leaderboard.png").read_bytes()[:4] == b"\x89PNG"


def test_omp_leaderboard_compares_result_dirs(tmp_path):
    for label, shift in (("base", 0.0), ("ablation", 0.2)):
        for v, r in RESULTS.items():
            res = json.loads(json.dumps(r))
            res["results"]["omp_arith_mc"]["acc,none"] += shift
            (tmp_path / label / "results").mkdir(parents=True, exist_ok=True)
            (tmp_path / label / "results" / f"{v}.json").write_text(json.dumps(res))
    proc = omp("leaderboard", "--dirs", f"base:{tmp_path / 'base'}", f"ablation:{tmp_path / 'ablation'}",
               "--baseline", "base/pretrain", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert "| ablation/posttrain | 0.750 (+0.450 ▲) |" in proc.stdout
    assert (tmp_path / "out/leaderboard.html").is_file()


def test_omp_leaderboard_without_results_is_a_clear_error(tmp_path):
    proc = omp("leaderboard", "--evaluate-dir", str(tmp_path / "nothing"), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "nothing/results: no results" in proc.stderr


def test_bradley_terry_recovers_known_strengths():
    rng = np.random.default_rng(0)
    true = np.log(np.array([1.0, 2.0, 4.0]))
    rows = []
    for _ in range(3000):
        i, j = rng.choice(3, 2, replace=False)
        p = np.exp(true[i]) / (np.exp(true[i]) + np.exp(true[j]))
        rows.append((i, j, float(rng.random() < p)))
    est = arena.fit_bradley_terry(3, np.array(rows), prior=0.0)
    assert np.allclose(est - est[0], true - true[0], atol=0.15)


def test_arena_ranks_the_variant_that_wins_items_with_a_separated_interval():
    items = {str(k): float(k % 3 != 0) for k in range(60)}          # wins 2/3 of the items
    scores = {"pretrain": {"t": {k: 0.5 for k in items}}, "posttrain": {"t": items}}
    r = arena.ratings(scores, rounds=100, seed=0, baseline="pretrain")
    top, second = r["variants"]
    assert top["name"] == "posttrain" and second["rating"] == 1000.0
    # P(win)=2/3 -> 400*log10(2) ≈ 120 Elo above the baseline
    assert 90 < top["rating"] - 1000 < 150 and top["lo"] > 1000
    assert r["battles"] == 60


def test_arena_with_one_variant_says_so():
    r = arena.ratings({"pretrain": {"t": {"0": 1.0}}})
    assert r["battles"] == 0 and "fewer than two" in r["note"]


@pytest.mark.skipif(shot.chromium() is None, reason="chromium not installed (apt-get install chromium)")
def test_leaderboard_html_renders_and_sorts_in_headless_chromium(tmp_path):
    leaderboard.write(tmp_path, RESULTS, None, None)
    html = tmp_path / "leaderboard.html"
    shot.screenshot(html, tmp_path / "shot.png", width=900, height=500)
    import matplotlib.image as mpimg

    img = mpimg.imread(tmp_path / "shot.png")
    assert img.shape[:2] == (500, 900) and img[..., :3].std() > 0.05  # not a blank page
    # sort by the bits_per_byte column (3rd header), descending: the worst bpb row comes first
    dom = shot.rendered_dom(html, "sort=tasks:2:desc")
    body = dom.split("<tbody>")[1]
    order = [v for v in RESULTS if f"<td>{v}</td>" in body]
    assert sorted(order, key=body.index) == ["quant-int4-rtn", "posttrain", "pretrain"]


@pytest.mark.e2e
def test_omp_leaderboard_gathers_dvc_experiments(tmp_path):
    """A real DVC repo whose stage writes artifacts/evaluate/metrics.json; one experiment changes it."""
    import shutil
    import subprocess

    if shutil.which("dvc") is None and not (Path(sys.executable).parent / "dvc").exists():
        pytest.skip("dvc not on PATH")
    env_path = f"{Path(sys.executable).parent}:{__import__('os').environ.get('PATH', '')}"

    def sh(*cmd):
        subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, env={**__import__('os').environ,
                                                                                 "PATH": env_path})
    (tmp_path / "params.yaml").write_text("acc: 0.5\n")
    (tmp_path / "make.py").write_text(
        "import json, os, yaml\nacc = yaml.safe_load(open('params.yaml'))['acc']\n"
        "os.makedirs('artifacts/evaluate', exist_ok=True)\n"
        "json.dump({'pretrain': {'omp_arith_mc': {'acc': acc}}}, open('artifacts/evaluate/metrics.json', 'w'))\n")
    (tmp_path / "dvc.yaml").write_text(
        f"stages:\n  evaluate:\n    cmd: {sys.executable} make.py\n    deps: [make.py]\n    params: [acc]\n"
        "    outs: [artifacts/evaluate]\nmetrics:\n  - artifacts/evaluate/metrics.json\n")
    sh("git", "init", "-q")
    sh("git", "config", "user.email", "t@example.com")
    sh("git", "config", "user.name", "t")
    sh("dvc", "init", "-q")
    sh("dvc", "repro", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "base")
    sh("dvc", "exp", "run", "-q", "-S", "acc=0.7", "-n", "abl1")
    proc = omp("leaderboard", "--experiments", cwd=tmp_path, env={"PATH": env_path})
    assert "| HEAD/pretrain | 0.500 |" in proc.stdout
    assert "| abl1/pretrain | 0.700 (+0.200 ▲) |" in proc.stdout
