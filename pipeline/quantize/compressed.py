"""Save weight-only int8 / int4 models in the compressed-tensors "pack-quantized" format.

transformers (with the compressed-tensors package) loads such a directory with
AutoModelForCausalLM.from_pretrained on CPU: it unpacks the int32 words and multiplies by the
scales, so the model it returns computes with exactly our dequantized weights. Embeddings,
norms and lm_head stay in float32 (listed under `ignore`).
"""

from __future__ import annotations

from pathlib import Path

import torch


def group_size_of(q: torch.Tensor, scale: torch.Tensor) -> int | None:
    return None if scale.shape[1] == 1 else q.shape[1] // scale.shape[1]


def quantization_config(bits: int, quantized: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """One config group per group size, each naming its modules exactly (layers of different widths
    may use different group sizes)."""
    by_group: dict[int | None, list[str]] = {}
    for name, (q, s) in quantized.items():
        by_group.setdefault(group_size_of(q, s), []).append(name)
    groups = {}
    for i, (g, names) in enumerate(sorted(by_group.items(), key=lambda kv: kv[0] or 0)):
        weights = {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False,
                   "strategy": "group" if g else "channel", "group_size": g, "observer": "minmax"}
        groups[f"group_{i}"] = {"targets": sorted(names), "weights": weights,
                                "input_activations": None, "output_activations": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "config_groups": groups, "ignore": ["lm_head"]}


def packed_state_dict(model, quantized: dict[str, tuple[torch.Tensor, torch.Tensor]], bits: int) -> dict:
    """The model's state dict with each quantized Linear's weight replaced by
    weight_packed (int32), weight_scale (float32) and weight_shape."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    sd = {}
    for key, value in model.state_dict().items():
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and module in quantized:
            q, s = quantized[module]
            sd[f"{module}.weight_packed"] = pack_to_int32(q, bits)
            sd[f"{module}.weight_scale"] = s.float().contiguous()
            sd[f"{module}.weight_shape"] = torch.tensor(list(q.shape))
        else:
            sd[key] = value.detach().contiguous()
    return sd


def save_quantized(model, tok, quantized: dict, bits: int, out: Path) -> None:
    """Write config.json (+ quantization_config), model.safetensors, tokenizer and generation config."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    sd = packed_state_dict(model, quantized, bits)
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # tied: transformers rebuilds it from the embeddings
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(bits, quantized)
    cfg = type(model.config).from_dict(config)
    cfg.save_pretrained(str(out))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out))
    tok.save_pretrained(str(out))
