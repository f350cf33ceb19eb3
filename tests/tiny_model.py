"""A stand-in for artifacts/pretrain/final in tests: a small Llama trained briefly on the micro data.

Same layout as the pretrain stage's output (config.json, model.safetensors, tokenizer files,
generation_config.json), so posttrain and quantize read it exactly as they read the real one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.core.order import PublishedOrder


def build_pretrained(workdir: Path, steps: int = 60, hidden: int = 64, layers: int = 2, seed: int = 0,
                     intermediate: int = 176, tied: bool = True) -> Path:
    """As the pretrain stage's micro model: tied embeddings, an MLP width (176) that 32 does not divide."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(workdir / "artifacts/tokenizer"))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=tied,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    order = PublishedOrder(workdir / "artifacts/blend", workdir / "artifacts/tokenize")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        ids = torch.from_numpy(order.batch(step % order.steps))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    out = workdir / "artifacts/pretrain/final"
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(str(out))
    from pipeline.core.integrity import seal

    seal(out.parent, {"stage": "pretrain", "stand_in": "tests/tiny_model.py"})  # recorded as the stage records it
    return out


import shutil  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def micro_pretrained(micro_data, tmp_path_factory) -> Path:
    """A copy of the micro data workdir with artifacts/pretrain/final (a briefly trained small Llama).

    Read-only for tests: copy it (copy_workdir) before running anything that writes.
    """
    work = tmp_path_factory.mktemp("pretrained") / "work"
    shutil.copytree(micro_data, work, symlinks=True)
    build_pretrained(work)
    return work
