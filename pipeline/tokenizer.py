"""tokenizer: a byte-level BPE trained on a deterministic sample of the mixture.

Output `artifacts/tokenizer/`: the files `transformers.AutoTokenizer.from_pretrained` loads
(tokenizer.json, tokenizer_config.json with eos/bos/pad and a ChatML chat template), and
provenance.json. With `tokenizer.pretrained_dir` the named tokenizer is copied instead.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from pipeline.core.config import Recipe, load_manifest, recipe_path
from pipeline.core.errors import reading
from pipeline.ingest import OUT as INGEST_DIR, read_documents
from pipeline.core.io import atomic_dir, read_json, sha256_file, write_json
from pipeline.core.paths import OUT as STAGE_OUT
from pipeline.core.provenance import provenance
from pipeline.core.integrity import confine, seal, verified, verify_stage

OUT = STAGE_OUT["tokenizer"]
EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]
# ChatML: the format post-training and the release use. The assistant turn ends with <|im_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def training_sample(recipe: Recipe, ingest_dir: Path = INGEST_DIR) -> list[str]:
    """Documents drawn from each source in proportion to its mixture weight, up to sample_bytes."""
    manifest = load_manifest(recipe.data.manifest)
    sample = []
    for name, share in manifest.target_shares.items():
        docs = read_documents(name, ingest_dir)
        random.Random(f"{recipe.seed}-tokenizer-{name}").shuffle(docs)
        budget, used = int(recipe.tokenizer.sample_bytes * share), 0
        for d in docs:
            if used >= budget:
                break
            sample.append(d)
            used += len(d.encode("utf-8"))
    return sample


def train_bpe(texts: list[str], vocab_size: int, min_frequency: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS, show_progress=True,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def save_hf_tokenizer(tok, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                 chat_template=CHAT_TEMPLATE, model_max_length=1_000_000)
    hf.save_pretrained(str(out))


def run(recipe: Recipe, ingest_dir: Path = INGEST_DIR, out_dir: Path = OUT) -> dict:
    cfg = recipe.tokenizer
    if not cfg.pretrained_dir:
        verify_stage(ingest_dir)
    with atomic_dir(out_dir) as tmp:
        if cfg.pretrained_dir:
            src = confine(cfg.pretrained_dir, f"{recipe_path(recipe)}: tokenizer.pretrained_dir", recipe.allow_paths)
            _vocab_size(src)  # a file tokenizers cannot read is refused naming it, before it is copied
            for f in sorted(src.iterdir()):
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
            inputs = {"pretrained_dir": sha256_file(src / "tokenizer.json")}
        else:
            sample = training_sample(recipe, ingest_dir)
            tok = train_bpe(sample, cfg.vocab_size, cfg.min_frequency)
            save_hf_tokenizer(tok, tmp)
            inputs = {"ingest": sha256_file(ingest_dir / "ingest.json")}
        info = {"vocab_size": _vocab_size(tmp), "tokenizer_sha256": sha256_file(tmp / "tokenizer.json")}
        seal(tmp, provenance("tokenizer", recipe, inputs, **info))
    return info


def _vocab_size(d: Path) -> int:
    from tokenizers import Tokenizer


    with reading(d / "tokenizer.json", "not a tokenizers file"):
        return Tokenizer.from_file(str(d / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def load(tokenizer_dir: Path = OUT):
    """The tokenizer as transformers loads it (what every later stage and the release use)."""
    from transformers import AutoTokenizer

    verify_stage(tokenizer_dir)
    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


def eos_id(tokenizer_dir: Path = OUT) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(verified(tokenizer_dir, "tokenizer.json"))).token_to_id(EOS)


def vocab_size(tokenizer_dir: Path = OUT) -> int:
    return verify_stage(tokenizer_dir)["vocab_size"]
