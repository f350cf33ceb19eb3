"""GGUF export for llama.cpp / ollama: llama.cpp tensor names, tokenizer and chat template metadata.

Tensors are written as llama.cpp's own converter writes a Llama: q_proj / k_proj rows permuted
(llama.cpp applies rotary embeddings to interleaved pairs, transformers to halves), 1-D tensors in
F32, matrices in the file's type (F16, Q8_0 or Q4_0, quantized by gguf-py in numpy). A matrix whose
row length is not a multiple of the 32-element quantization block stays F16.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline.tokenizer import IM_END

FILE_TYPES = {"F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0", "Q4_0": "MOSTLY_Q4_0"}


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of q/k from transformers' half-split rotary layout to llama.cpp's interleaved one."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _heads(config) -> tuple[int, int]:
    n_head = config.num_attention_heads
    return n_head, getattr(config, "num_key_value_heads", None) or n_head


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """llama.cpp name → float32 array (q/k permuted) for every tensor of a LlamaForCausalLM."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    n_head, n_kv = _heads(cfg)
    out = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"{key}: no llama.cpp tensor name for this transformers tensor")
        arr = value.detach().float().numpy()
        if key.endswith("q_proj.weight"):
            arr = permute_rope(arr, n_head)
        elif key.endswith("k_proj.weight"):
            arr = permute_rope(arr, n_kv)
        out[name] = np.ascontiguousarray(arr)
    return out


def tensor_type(arr: np.ndarray, file_type: str):
    import gguf

    if arr.ndim == 1:
        return gguf.GGMLQuantizationType.F32
    if file_type == "F16" or arr.shape[-1] % 32:
        return gguf.GGMLQuantizationType.F16
    return gguf.GGMLQuantizationType[file_type]


def _add_tokenizer(writer, tokenizer_dir: Path) -> None:
    import gguf

    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = dict(spec["model"]["vocab"])
    special = {}
    for t in spec.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
        if t.get("special"):
            special[t["id"]] = t["content"]
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"{tokenizer_dir}/tokenizer.json: token ids are not contiguous from 0")
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")  # byte-level BPE, as GPT-2
    writer.add_tokenizer_pre("gpt-2")  # llama.cpp's name for GPT-2's split regex ("gpt2" fails to load)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    for field, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                       ("pad_token", writer.add_pad_token_id)):
        if isinstance(cfg.get(field), str) and cfg[field] in vocab:
            add(vocab[cfg[field]])
    # the end of a chat turn: llama.cpp stops generation there (it would otherwise guess from the text)

    if IM_END in vocab:
        writer.add_eot_token_id(vocab[IM_END])
    writer.add_add_bos_token(False)
    template = cfg.get("chat_template")
    if template is None and (tokenizer_dir / "chat_template.jinja").is_file():
        template = (tokenizer_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if template:
        writer.add_chat_template(template)


def export_gguf(model, tokenizer_dir: Path, path: Path, file_type: str, name: str = "omp") -> None:
    """Write `model` (LlamaForCausalLM) as one GGUF file of type F16, Q8_0 or Q4_0."""
    import gguf

    cfg = model.config
    n_head, n_kv = _heads(cfg)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[file_type]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer_dir)
    for tname, arr in gguf_tensors(model).items():
        qtype = tensor_type(arr, file_type)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tname, arr.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(tname, arr.astype(np.float16))
        else:
            writer.add_tensor(tname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_gguf(path: Path) -> dict[str, tuple[np.ndarray, str]]:
    """llama.cpp name → (dequantized float32 array in numpy (rows, cols) order, type name)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(x) for x in reversed(t.shape))
        out[t.name] = (arr.reshape(shape), t.tensor_type.name)
    return out


def load_into(model, path: Path) -> None:
    """Load a GGUF file's dequantized weights into a transformers Llama of the same shape (in place),
    so its perplexity is measured by the same code as every other variant."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    n_head, n_kv = _heads(cfg)
    tensors = read_gguf(path)
    with torch.no_grad():
        for key, param in model.state_dict().items():
            if key == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False):
                continue
            arr, _ = tensors[names.get_name(key, try_suffixes=(".weight", ".bias"))]
            if key.endswith("q_proj.weight"):
                arr = unpermute_rope(arr, n_head)
            elif key.endswith("k_proj.weight"):
                arr = unpermute_rope(arr, n_kv)
            param.copy_(torch.from_numpy(np.ascontiguousarray(arr)).to(param.dtype))
