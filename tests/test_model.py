"""The model is transformers' LlamaForCausalLM built from the recipe; it round-trips through save/load."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.config import ModelCfg, load_recipe
from pipeline.core.errors import RecipeError
from pipeline.core.model import build_model, count_params


def test_build_matches_recipe_and_is_seeded():
    cfg = ModelCfg(layers=2, hidden_size=64, heads=4, kv_heads=2, intermediate_size=176, rope_theta=5e5)
    m = build_model(cfg, vocab_size=512, context_length=64, special_ids={"eos": 0, "pad": 1}, seed=3)
    c = m.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (2, 64, 4, 2)
    assert c.intermediate_size == 176 and c.max_position_embeddings == 64 and c.vocab_size == 512
    assert c.tie_word_embeddings and m.lm_head.weight is m.model.embed_tokens.weight
    # embeddings 512*64 (tied) + per layer: q,o 64*64, k,v 64*32, mlp 3*64*176, 2 norms; final norm
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 176 + 2 * 64
    assert count_params(m) == 512 * 64 + 2 * per_layer + 64
    again = build_model(cfg, 512, 64, special_ids={"eos": 0, "pad": 1}, seed=3)
    other = build_model(cfg, 512, 64, special_ids={"eos": 0, "pad": 1}, seed=4)
    sd, sd2, sd3 = m.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert not torch.equal(sd["model.embed_tokens.weight"], sd3["model.embed_tokens.weight"])


def test_saved_model_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = ModelCfg(layers=1, hidden_size=32, heads=2, kv_heads=1, intermediate_size=64, tie_embeddings=False)
    m = build_model(cfg, 300, 32, seed=0).eval()
    m.save_pretrained(str(tmp_path), safe_serialization=True)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), use_safetensors=True).eval()
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.equal(m(x).logits, back(x).logits)


def test_bad_model_dims_name_the_key(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\npretrain:\n  model: {hidden_size: 100, heads: 3}\n")
    with pytest.raises(RecipeError, match=r"pretrain\.model.*not divisible by heads 3"):
        load_recipe(p, check_files=False)
    p.write_text("name: x\npretrain:\n  lr: -1\n")
    with pytest.raises(RecipeError, match=r"pretrain\.lr"):
        load_recipe(p, check_files=False)
    p.write_text("name: x\npretrain:\n  optimiser: adam\n")
    with pytest.raises(RecipeError, match=r"pretrain\.optimiser: unknown key"):
        load_recipe(p, check_files=False)
