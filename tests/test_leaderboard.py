"""The leaderboard renders from lm-eval results files; the arena fits Bradley-Terry correctly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.core import leaderboard
from pipeline.evaluate import arena
from tests.conftest import REPO, omp

sys.path.insert(0, str(REPO / "evals"))
import screenshot_leaderboard as shot  # noqa: E402


def lm_eval_result(bpb: float, acc: float, bpb_se="N/A") -> dict:
    """The parts of lm-eval's results JSON the leaderboard reads (its real key layout)."""
    return {"results": {"omp_ppl_python_docs": {"alias": "omp_ppl_python_docs", "bits_per_byte,none": bpb,
                                                "bits_per_byte_stderr,none": bpb_se, "byte_perplexity,none": 2 ** bpb,
                                                "byte_perplexity_stderr,none": "N/A"},
                        "omp_arith_mc": {"alias": "omp_arith_mc", "acc,none": acc, "acc_stderr,none": 0.01,
                                         "sample_len,none": 200}},
            "n-samples": {"omp_ppl_python_docs": {"original": 17, "effective": 17},
                          "omp_arith_mc": {"original": 200, "effective": 200}},
            "versions": {"omp_ppl_python_docs": 1.0, "omp_arith_mc": 1.0}}


RESULTS = {"pretrain": lm_eval_result(2.0, 0.30, 0.05), "posttrain": lm_eval_result(2.1, 0.55),
           "quant-int4-rtn": lm_eval_result(2.5, 0.40, 0.05), "quant-int8-rtn": lm_eval_result(2.05, 0.32, 0.05)}


def test_markdown_has_values_stderr_n_and_only_significant_arrows():
    md = leaderboard.markdown(RESULTS)
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ")}
    # columns sorted by task name: omp_arith_mc then omp_ppl_python_docs, each with its n
    assert rows["variant"].startswith("| variant | omp_arith_mc (acc, n=200) | omp_ppl_python_docs (bits_per_byte, n=17)")
    assert rows["pretrain"] == "| pretrain | 0.300 ± 0.010 | 2.0000 ± 0.0500 |"
    # +0.250 is 17.7 standard errors of the difference: marked; the bpb delta has no stderr: unmarked
    assert rows["posttrain"] == "| posttrain | 0.550 ± 0.010 (+0.250 ▲) | 2.1000 (+0.100) |"
    # bpb +0.500 > 1.96 * sqrt(2) * 0.05 = 0.139: worse (▼); bpb +0.05 and acc +0.02 are within noise
    assert rows["quant-int4-rtn"] == "| quant-int4-rtn | 0.400 ± 0.010 (+0.100 ▲) | 2.5000 ± 0.0500 (+0.500 ▼) |"
    assert rows["quant-int8-rtn"] == "| quant-int8-rtn | 0.320 ± 0.010 (+0.020) | 2.0500 ± 0.0500 (+0.050) |"


def test_flat_metrics_keep_numbers_stderr_and_n():
    flat = leaderboard.flat_metrics(RESULTS)
    assert flat["posttrain"]["omp_ppl_python_docs"] == {"bits_per_byte": 2.1, "byte_perplexity": 2 ** 2.1, "n": 17}
    assert flat["pretrain"]["omp_arith_mc"] == {"acc": 0.30, "acc_stderr": 0.01, "n": 200}  # no sample_len
    # read back as --experiments does: the same cells (value, stderr, n)
    back = {v: {"results": {t: {f"{k},none": x for k, x in m.items()} for t, m in tasks.items()}}
            for v, tasks in flat.items()}
    assert leaderboard.table(back) == leaderboard.table(RESULTS)


def test_png_leaves_out_all_zero_panels(tmp_path):
    res = json.loads(json.dumps(RESULTS))
    for r in res.values():
        r["results"]["omp_arith_gen"] = {"exact_match,none": 0.0, "exact_match_stderr,none": 0.0}
    drawn = leaderboard.plot(res, tmp_path / "b.png")
    assert drawn == ["omp_arith_mc", "omp_ppl_python_docs"]
    import matplotlib.image as mpimg

    img = mpimg.imread(tmp_path / "b.png")
    assert img.shape[0] >= 400 and img.shape[1] >= 1000  # two panels of ~5 x 4.4 inches at 100 dpi


def test_html_table_and_png_are_written(tmp_path):
    ratings = arena.ratings({"pretrain": {"t": {"0": 1.0, "1": 1.0}}, "posttrain": {"t": {"0": 0.0, "1": 1.0}}},
                            rounds=20)
    leaderboard.write(tmp_path, RESULTS, ratings, None)
    page = (tmp_path / "leaderboard.html").read_text()
    assert page.count("<tr>") == 1 + 4 + 1 + 2  # task header + 4 variants, arena header + 2
    assert "n=200" in page and "± 0.010" in page
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
    assert "| ablation/posttrain | 0.750 ± 0.010 (+0.450 ▲) |" in proc.stdout
    assert "wrote" in proc.stderr and "wrote" not in proc.stdout  # status on stderr, the table on stdout
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
    assert sorted(order, key=body.index) == ["quant-int4-rtn", "posttrain", "quant-int8-rtn", "pretrain"]


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
        "json.dump({'pretrain': {'omp_arith_mc': {'acc': acc, 'acc_stderr': 0.02, 'n': 200}}},"
        " open('artifacts/evaluate/metrics.json', 'w'))\n")
    (tmp_path / "dvc.yaml").write_text(
        f"stages:\n  evaluate:\n    cmd: {sys.executable} make.py\n    deps: [make.py]\n    params: [acc]\n"
        "    outs: [artifacts/evaluate]\nmetrics:\n  - artifacts/evaluate/metrics.json\n")
    sh("git", "init", "-q")
    sh("git", "config", "user.email", "t@example.com")
    sh("git", "config", "user.name", "t")
    sh("dvc", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "pipeline")
    sh("dvc", "repro", "-q")
    # right after a repro (what `make repro` leaves): the commit has no evaluate output, the workspace has
    proc = omp("leaderboard", "--experiments", cwd=tmp_path, env={"PATH": env_path})
    assert "| workspace/pretrain | 0.500 ± 0.020 |" in proc.stdout and "HEAD/pretrain" not in proc.stdout
    assert "HEAD: no artifacts/evaluate/metrics.json" in proc.stderr
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "base")
    sh("dvc", "exp", "run", "-q", "-S", "acc=0.7", "-n", "abl1")
    proc = omp("leaderboard", "--experiments", "--baseline", "HEAD/pretrain", cwd=tmp_path, env={"PATH": env_path})
    assert "| HEAD/pretrain | 0.500 ± 0.020 |" in proc.stdout
    assert "| abl1/pretrain | 0.700 ± 0.020 (+0.200 ▲) |" in proc.stdout
    assert "| omp_arith_mc (acc, n=200) |" in proc.stdout
