"""quantize: RTN and GPTQ error bounds, the compressed-tensors round trip, GGUF export, the stage."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.io import read_json
from pipeline.quantize.gptq import HessianHook, quantize_gptq
from pipeline.quantize.rtn import dequantize, quantize_rtn
from tests.conftest import MICRO, omp
from tests.tiny_model import micro_pretrained  # noqa: F401  (fixture)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def test_rtn_int8_per_channel_and_int4_groups_round_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    q, s = quantize_rtn(w, 8)
    assert q.dtype == torch.int8 and s.shape == (48, 1)
    assert int(q.abs().max()) == 127
    assert torch.all((w - dequantize(q, s)).abs() <= s / 2 + 1e-6)
    q4, s4 = quantize_rtn(w, 4, group_size=32)
    assert s4.shape == (48, 4) and int(q4.min()) >= -8 and int(q4.max()) <= 7
    err = (w - dequantize(q4, s4)).abs().reshape(48, 4, 32)
    assert torch.all(err <= s4.unsqueeze(-1) / 2 + 1e-6)
    # each group's largest weight lands exactly on the top code
    assert torch.all((q4.reshape(48, 4, 32).abs().amax(-1)) == 7)
    with pytest.raises(ValueError, match="do not split into groups of 48"):
        quantize_rtn(w, 4, group_size=48)


def test_gptq_has_lower_output_error_than_rtn():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64, bias=False)
    # correlated, unevenly scaled inputs: where error-aware rounding pays off
    x = torch.randn(2048, 16) @ torch.randn(16, 128) + 0.1 * torch.randn(2048, 128)
    x = x * torch.linspace(0.2, 3.0, 128)
    hook = HessianHook(lin)
    with torch.no_grad():
        lin(x)
    h = hook.hessian()
    assert hook.tokens == 2048
    ref = (x @ lin.weight.T).detach()

    def out_err(q, s):
        return float(((x @ dequantize(q, s).T - ref) ** 2).mean().detach())

    rtn = out_err(*quantize_rtn(lin.weight, 4, 32))
    gptq_q, gptq_s = quantize_gptq(lin.weight, h, 4, 32)
    assert int(gptq_q.min()) >= -8 and int(gptq_q.max()) <= 7 and gptq_s.shape == (64, 4)
    assert out_err(gptq_q, gptq_s) < 0.5 * rtn


def _load_model(d: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32)])
def test_compressed_tensors_round_trip_on_cpu(micro_pretrained, tmp_path, bits, group):
    from transformers import AutoTokenizer

    from pipeline.quantize import apply_dequantized, quantizable, quantize_model_rtn
    from pipeline.quantize.compressed import save_quantized

    src = micro_pretrained / "artifacts/pretrain/final"
    model, tok = _load_model(src), AutoTokenizer.from_pretrained(str(src))
    q = quantize_model_rtn(model, bits, group)
    save_quantized(model, tok, q, bits, tmp_path / "v")
    loaded = _load_model(tmp_path / "v")
    apply_dequantized(model, q)  # the reference: our own dequantized weights
    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():  # compressed-tensors unpacks the weights on the first forward
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-4)
    for name, mod in quantizable(model).items():
        assert torch.allclose(dict(loaded.named_modules())[name].weight, mod.weight, atol=1e-6), name
    groups = read_json(tmp_path / "v/config.json")["quantization_config"]["config_groups"].values()
    assert {g["weights"]["num_bits"] for g in groups} == {bits}
    # the MLP's 176 input columns take groups of 22 (176 = 8 x 22), every other layer groups of 32
    want = {None: 14} if group is None else {22: 2, 32: 12}
    assert {g["weights"]["group_size"]: len(g["targets"]) for g in groups} == want


def test_gguf_export_reads_back_within_bounds(micro_pretrained, tmp_path):
    import gguf

    from pipeline.quantize.gguf_export import export_gguf, gguf_tensors, load_into, permute_rope, read_gguf, unpermute_rope

    src = micro_pretrained / "artifacts/pretrain/final"
    model = _load_model(src)
    ref = gguf_tensors(model)
    assert {"token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight",
            "blk.1.ffn_down.weight", "blk.0.attn_norm.weight"} <= set(ref)
    assert ("output.weight" in ref) == (not model.config.tie_word_embeddings)  # tied: llama.cpp reuses token_embd
    x = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
    assert np.array_equal(unpermute_rope(permute_rope(x, 4), 4), x) and not np.array_equal(permute_rope(x, 4), x)

    # per-element bounds from each 32-element block's largest |w| (amax); the block scale itself is
    # stored in fp16 (relative error <= 2^-11, times up to 127 codes). Q8_0: half a step of amax/127.
    # Q4_0: scale amax/8 with codes -8..7, so the one weight at +amax may clip by a whole step.
    bounds = {"F16": lambda w, amax: 1e-3 * np.abs(w) + 1e-7,
              "Q8_0": lambda w, amax: amax * (0.5 / 127 + 1e-3) + 1e-7,
              "Q4_0": lambda w, amax: amax * (1 / 8 + 2e-3) + 1e-7}
    ids = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():
        base_logits = model(ids).logits
    for ft in ("F16", "Q8_0", "Q4_0"):
        path = tmp_path / f"m-{ft}.gguf"
        export_gguf(model, src, path, ft)
        back = read_gguf(path)
        assert set(back) == set(ref)
        for name, w in ref.items():
            got, kind = back[name]
            assert got.shape == w.shape, name
            if w.ndim == 1:
                assert kind == "F32" and np.array_equal(got, w)
                continue
            # rows that are not a whole number of 32-element blocks stay F16 (as llama.cpp's converter does)
            assert kind == (ft if w.shape[-1] % 32 == 0 else "F16"), name
            if kind == "F16":
                assert np.all(np.abs(got - w) <= 1e-3 * np.abs(w) + 1e-7)
                continue
            amax = np.repeat(np.abs(w).reshape(w.shape[0], -1, 32).max(-1), 32, axis=-1)
            assert np.all(np.abs(got - w) <= bounds[ft](w, amax)), (ft, name)
        reader = gguf.GGUFReader(str(path))
        fields = reader.fields
        tokens = fields["tokenizer.ggml.tokens"]
        assert len(tokens.data) == model.config.vocab_size
        tmpl = bytes(fields["tokenizer.chat_template"].parts[-1]).decode()
        assert "<|im_start|>" in tmpl
        assert int(fields["llama.block_count"].parts[-1][0]) == model.config.num_hidden_layers
        eos = int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0])
        assert eos == model.config.eos_token_id
        # the end of a chat turn is explicit: llama.cpp stops generating at <|im_end|>
        eot = int(fields["tokenizer.ggml.eot_token_id"].parts[-1][0])
        assert bytes(tokens.parts[tokens.data[eot]]).decode() == "<|im_end|>"
        # the dequantized GGUF weights, un-permuted, run in transformers close to the source
        work = _load_model(src)
        load_into(work, path)
        with torch.no_grad():
            diff = float((work(ids).logits - base_logits).abs().max())
        assert diff < {"F16": 1e-2, "Q8_0": 5e-2, "Q4_0": 1.0}[ft], (ft, diff)

    # an independent reader: transformers' own GGUF loader (its llama.cpp name map, q/k un-permutation
    # and tokenizer conversion) gives the same logits and the same token ids
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m-F16.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert float((hf(ids).logits - base_logits).abs().max()) < 1e-2
    text = "Q: What is 12 + 7?\n<|im_start|>assistant\n19<|im_end|>"
    assert (AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m-F16.gguf")(text)["input_ids"]
            == AutoTokenizer.from_pretrained(str(src))(text)["input_ids"])


@pytest.mark.e2e
def test_quantize_stage_report_and_variants(micro_pretrained, copy_workdir):
    work = copy_workdir(micro_pretrained)
    # quantize reads only artifacts/posttrain/final: the stand-in pretrained model plays that part
    shutil.copytree(work / "artifacts/pretrain/final", work / "artifacts/posttrain/final")
    from pipeline.core.integrity import seal

    seal(work / "artifacts/posttrain", {"stage": "posttrain", "stand_in": "artifacts/pretrain/final"})
    proc = omp("quantize", "--recipe", MICRO, cwd=work, env={"HF_HUB_OFFLINE": "1"})
    assert "| int4-gptq-g32 |" in proc.stdout
    out = work / "artifacts/quantize"
    report = read_json(out / "report.json")
    names = [v["name"] for v in report["variants"]]
    assert names == ["int8-rtn", "int4-rtn-g32", "int4-gptq-g32", "gguf-f16", "gguf-int8-q8_0", "gguf-int4-q4_0"]
    base = report["baseline_ppl"]
    assert 1 < base < 512  # vocab 512: anything above is worse than uniform
    for v in report["variants"]:
        assert set(v) >= {"name", "format", "bytes", "ppl", "ppl_delta_pct", "path"}
        assert (out / v["path"]).exists() and v["bytes"] > 0
        assert v["ppl_delta_pct"] == pytest.approx(100 * (v["ppl"] - base) / base)
        if v["format"].startswith("compressed-tensors"):
            assert v["bytes"] < report["baseline_bytes"]
            _load_model(out / v["path"])  # loadable on CPU by transformers
    by = {v["name"]: v for v in report["variants"]}
    assert abs(by["int8-rtn"]["ppl_delta_pct"]) < 1.0
    assert abs(by["gguf-f16"]["ppl_delta_pct"]) < 0.1
    assert by["gguf-int4-q4_0"]["bytes"] < by["gguf-int8-q8_0"]["bytes"] < by["gguf-f16"]["bytes"]
    assert (out / "report.md").read_text().count("\n| ") == 8  # header, baseline, 6 variants
    assert read_json(out / "provenance.json")["stage"] == "quantize"


def test_recipe_errors_name_the_key(micro_data):
    from pipeline.core.config import load_recipe
    from pipeline.core.errors import RecipeError

    with pytest.raises(RecipeError, match=r"quantize\.methods\.0"):
        load_recipe(micro_data / MICRO, check_files=False, overrides={"quantize": {"methods": ["int3-rtn"]}})
    with pytest.raises(RecipeError, match=r"quantize\.group_size"):
        load_recipe(micro_data / MICRO, check_files=False, overrides={"quantize": {"group_size": 0}})


def test_layers_the_group_does_not_divide_take_the_largest_divisor():
    from pipeline.quantize.rtn import effective_group

    assert [effective_group(c, 32) for c in (64, 688, 176, 100, 7)] == [32, 16, 22, 25, 7]
    q, s = quantize_rtn(torch.randn(8, 688), 4, effective_group(688, 32))
    assert s.shape == (8, 43)
