"""posttrain: chat formatting and assistant-only loss masking, SFT data loaders, DPO, the stage."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from pipeline.core.config import DPOCfg, load_recipe
from pipeline.core.errors import PipelineError, RecipeError
from pipeline.core.io import read_json, sha256_file
from pipeline.sources import arithmetic
from tests.conftest import MICRO, omp
from tests.tiny_model import micro_pretrained  # noqa: F401  (fixture)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok(micro_data):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(micro_data / "artifacts/tokenizer"))


def test_loss_covers_only_assistant_tokens(tok):
    from pipeline.posttrain import IGNORE, tokenize_conversation

    conv = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
            {"role": "user", "content": "And 4 * 4?"}, {"role": "assistant", "content": "16"}]
    ex = tokenize_conversation(tok, conv, max_len=512)
    # the pieces reassemble the exact chat-template render
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(conv, tokenize=False)
    assert len(ex.labels) == len(ex.input_ids)
    # labelled tokens: exactly the two answers, each with its closing tag
    spans, cur = [], []
    for i, l in zip(ex.input_ids, ex.labels):
        if l == IGNORE:
            if cur:
                spans.append(cur)
            cur = []
        else:
            assert l == i
            cur.append(i)
    if cur:
        spans.append(cur)
    assert [tok.decode(s) for s in spans] == ["5<|im_end|>\n", "16<|im_end|>\n"]
    # the user turns and the assistant headers are masked
    masked = tok.decode([i for i, l in zip(ex.input_ids, ex.labels) if l == IGNORE])
    assert "What is 2 + 3?" in masked and "<|im_start|>assistant\n" in masked and "16" not in masked


def test_truncation_cuts_labels_with_ids(tok):
    from pipeline.posttrain import tokenize_conversation

    conv = [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "answer"}]
    ex = tokenize_conversation(tok, conv, max_len=10)
    assert len(ex.input_ids) == len(ex.labels) == 10


def test_sft_pairs_never_contain_heldout_problems(micro_data):
    from pipeline.ingest import read_documents
    from pipeline.posttrain import arithmetic_pairs, docs_pairs

    recipe = load_recipe(micro_data / MICRO, check_files=False)
    opts = next(s for s in _manifest(micro_data).sources if s.name == "arithmetic").arithmetic
    pairs = arithmetic_pairs(read_documents("arithmetic", micro_data / "artifacts/ingest"))
    assert len(pairs) > 1000
    heldout = {arithmetic.question(*p) for p in arithmetic.heldout_problems(opts, 10_000)}
    assert heldout and not heldout & {q for q, _ in pairs}
    for q, a in pairs[:50]:  # answers are right
        x, op, y = q.removeprefix("What is ").removesuffix("?").split(" ")
        assert int(a) == arithmetic.answer(int(x), op, int(y))
    docs = docs_pairs(read_documents("python-docs", micro_data / "artifacts/ingest"), max_chars=200)
    assert len(docs) > 10 and all(q.startswith("What does the Python") and 0 < len(a) <= 200 for q, a in docs)
    assert recipe.posttrain.sft[0].builtin == "arithmetic-qa"


def _manifest(workdir):
    from pipeline.core.config import load_manifest

    return load_manifest(workdir / "tests/recipes/micro_manifest.yaml")


def test_local_messages_files_use_the_hub_loader(micro_data, tmp_path, monkeypatch):
    from pipeline.posttrain import sft_conversations

    monkeypatch.chdir(micro_data)
    good = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
            for i in range(5)]
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    outside = {"posttrain": {"sft": [{"kind": "local", "paths": [str(good)]}]}}
    with pytest.raises(PipelineError, match=r"posttrain\.sft\.paths: .*chat\.jsonl is outside the project"):
        sft_conversations(load_recipe(MICRO, overrides=outside), Path("artifacts/ingest"))
    recipe = load_recipe(MICRO, overrides={**outside, "allow_paths": [str(tmp_path)]})  # opted in by name
    convs = sft_conversations(recipe, Path("artifacts/ingest"))
    assert sorted(c[1]["content"] for c in convs) == [f"hello {i}" for i in range(5)]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    recipe = load_recipe(MICRO, overrides={"posttrain": {"sft": [{"kind": "local", "paths": [str(bad)]}]},
                                           "allow_paths": [str(tmp_path)]})
    with pytest.raises(PipelineError, match=r"bad\.jsonl row 0: conversation has no assistant turn"):
        sft_conversations(recipe, Path("artifacts/ingest"))


def test_recipe_rejects_unpinned_hub_sft(micro_data):
    with pytest.raises(RecipeError, match=r"posttrain\.sft\.0.*revision"):
        load_recipe(micro_data / MICRO, check_files=False,
                    overrides={"posttrain": {"sft": [{"kind": "hf", "repo_id": "org/chat"}]}})


def test_dpo_prefers_chosen_answers(micro_pretrained, monkeypatch):
    from pipeline.posttrain import collate, dpo, load_model, preference_pairs, tokenize_conversation, token_logprobs

    monkeypatch.chdir(micro_pretrained)
    recipe = load_recipe(MICRO)
    model, tok = load_model(Path("artifacts/pretrain/final"))
    pairs = preference_pairs(recipe)[:16]
    assert all(c != r and int(c) != int(r) for _, c, r in pairs)

    def margin():
        ch = collate([tokenize_conversation(tok, p + [{"role": "assistant", "content": c}], 64) for p, c, _ in pairs], 0)
        rj = collate([tokenize_conversation(tok, p + [{"role": "assistant", "content": r}], 64) for p, _, r in pairs], 0)
        with torch.no_grad():
            return float((token_logprobs(model, ch)[0] - token_logprobs(model, rj)[0]).mean())

    before = margin()
    log = dpo(model, tok, pairs, DPOCfg(steps=12, batch_size=8, lr=1e-3, pairs=16), 64, seed=0)
    assert log[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 0
    assert log[-1]["loss"] < 0.6
    assert margin() > before + 1.0


def test_replay_examples_are_seeded_rows_of_the_published_order(micro_data):
    """Replay mixes what pretraining read (decontaminated rows of the published order, hashes
    checked) into SFT, labelled on every token; the same seed gives the same rows."""
    import random

    from pipeline.core.order import PublishedOrder
    from pipeline.posttrain import replay_examples

    dirs = dict(blend_dir=micro_data / "artifacts/blend", tokenize_dir=micro_data / "artifacts/tokenize")
    assert replay_examples(0, 32, 7, **dirs) == ([], None)
    got, blend_sha = replay_examples(5, 32, 7, **dirs)
    order = PublishedOrder(**dirs)
    rows = random.Random("7-replay").sample(range(len(order.indices)), 5)
    assert [e.input_ids for e in got] == [[int(t) for t in order.instance(r)[:32]] for r in rows]
    assert all(e.labels == e.input_ids and len(e.input_ids) == 32 for e in got)
    assert blend_sha == sha256_file(micro_data / "artifacts/blend/blend.json")
    assert [e.input_ids for e in replay_examples(5, 32, 7, **dirs)[0]] == [e.input_ids for e in got]
    assert [e.input_ids for e in replay_examples(5, 32, 8, **dirs)[0]] != [e.input_ids for e in got]


@pytest.mark.e2e
def test_posttrain_stage_outputs_lineage_metrics_and_is_deterministic(micro_pretrained, copy_workdir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from pipeline import posttrain

    work = copy_workdir(micro_pretrained)
    proc = omp("posttrain", "--recipe", MICRO, cwd=work, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert "arithmetic exact match" in proc.stdout
    out = work / "artifacts/posttrain"
    lineage = read_json(out / "final/lineage.json")
    assert lineage["parent"]["sha256"] == sha256_file(work / "artifacts/pretrain/final/model.safetensors")
    assert lineage["model_sha256"] == sha256_file(out / "final/model.safetensors")
    m = read_json(out / "metrics.json")
    for key in ("arith_em_before", "arith_em_after", "arith_em_after_sft"):
        assert 0.0 <= m[key] <= 1.0
    assert m["arith_eval_problems"] == 50
    assert m["sft_loss_last"] < 0.6 * m["sft_loss_first"]
    assert m["dpo_loss_first"] == pytest.approx(0.6931, abs=1e-3)
    model = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    assert model.config.model_type == "llama"
    assert not list(out.parent.glob(".posttrain.tmp-*"))

    # same recipe, same inputs: bitwise the same weights
    monkeypatch.chdir(work)
    posttrain.run(load_recipe(MICRO), out_dir=work / "again")
    assert sha256_file(work / "again/final/model.safetensors") == sha256_file(out / "final/model.safetensors")


def test_length_groups_and_scored_positions_give_the_loss_of_the_whole_padded_batch():
    """SFT's two speed-ups change no number: the head applied only where a label is scored, and a
    batch cut into length groups, give the full-logits per-sequence log-probs and the same gradient."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.posttrain import IGNORE, Example, collate, length_groups, token_logprobs

    assert length_groups([128, 20, 20, 20, 20, 20, 20, 128]) == [[1, 2, 3, 4, 5, 6], [0, 7]]
    assert length_groups([30, 31, 30]) == [[0, 2, 1]]          # nothing to gain: one group
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         tie_word_embeddings=True))
    g = torch.Generator().manual_seed(1)
    rows = []
    for n in (120, 9, 7, 12, 120, 8, 10, 11):
        ids = torch.randint(1, 97, (n,), generator=g).tolist()
        rows.append(Example(ids, [IGNORE] * (n // 2) + ids[n // 2:]))
    batch = collate(rows, 0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    ref = (torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
           * (labels != IGNORE)).sum(-1)
    lp, n = token_logprobs(model, batch)
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)
    assert n.tolist() == [(len(r.labels) - 1) - (len(r.labels) // 2 - 1) for r in rows]
    (-ref.sum() / n.sum()).backward()
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    groups = length_groups([len(r.input_ids) for r in rows])
    assert len(groups) == 2
    for grp in groups:
        part, _ = token_logprobs(model, collate([rows[j] for j in grp], 0))
        (-part.sum() / n.sum()).backward()
    for a, b in zip(whole, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
