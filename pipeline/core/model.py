"""The model: a transformers LlamaForCausalLM built from the recipe's `pretrain.model` section.

Using the library class (not our own module) means every checkpoint loads directly in
transformers, lm-eval and the GGUF converter. The model knows nothing about distribution.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.core.config import ModelCfg
from pipeline.core.integrity import verified, verify_stage
from pipeline.core.io import read_json


def llama_config(cfg: ModelCfg, vocab_size: int, context_length: int, special_ids: dict[str, int | None]):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.context_length or context_length,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_dropout=0.0,
        bos_token_id=special_ids.get("bos"),
        eos_token_id=special_ids.get("eos"),
        pad_token_id=special_ids.get("pad"),
    )


def build_model(cfg: ModelCfg, vocab_size: int, context_length: int,
                special_ids: dict[str, int | None] | None = None, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised fp32 LlamaForCausalLM; the same seed gives the same weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(cfg, vocab_size, context_length, special_ids or {}))
    return model.float()


def special_ids(tokenizer_dir: Path) -> dict[str, int | None]:
    """bos/eos/pad ids as tokenizer_config.json declares them (the tokenizer stage writes them)."""
    from tokenizers import Tokenizer


    verify_stage(tokenizer_dir)  # the tokenizer files are the ones the tokenizer stage recorded
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    conf = read_json(tokenizer_dir / "tokenizer_config.json")

    def tid(key):
        name = conf.get(key)
        if isinstance(name, dict):
            name = name.get("content")
        return tok.token_to_id(name) if name else None

    return {"bos": tid("bos_token"), "eos": tid("eos_token"), "pad": tid("pad_token")}


def vocab_size(tokenizer_dir: Path) -> int:
    from tokenizers import Tokenizer


    return Tokenizer.from_file(str(verified(tokenizer_dir, "tokenizer.json"))).get_vocab_size(with_added_tokens=True)


def count_params(model: torch.nn.Module) -> int:
    """Unique parameters (tied embedding and head counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
