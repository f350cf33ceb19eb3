"""posttrain: supervised fine-tuning on chat data, then (optionally) DPO, from the pretrained model.

Input: `artifacts/pretrain/final/` (a Hugging Face Llama directory with the tokenizer and its ChatML
template), the ingested sources and the recipe's `posttrain` section.
With `posttrain.replay_examples`, rows of the published pretraining order (artifacts/blend +
artifacts/tokenize, hashes checked) are mixed into SFT with the loss on every token (replay).
Output `artifacts/posttrain/`: `final/` (Hugging Face model directory + lineage.json whose parent is
the sha256 of the pretrain weights), `metrics.json` (losses, arith_em_before / arith_em_after) and
provenance.json.

The loop is our own compact one (torch AdamW, fixed seeds, a seeded example order), not TRL: it is
the same model and optimizer as pretraining, every example and step is reproducible from the
recipe, and nothing else (Trainer callbacks, dataloader workers, hub lookups) sits in between.
"""

from __future__ import annotations

import copy
import glob
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.core import ladder, numerics
from pipeline.core.config import Recipe, SFTSourceCfg, load_manifest, recipe_path
from pipeline.core.device import autocast as device_autocast
from pipeline.core.device import resolve as resolve_device
from pipeline.core.errors import CheckpointError, PipelineError, RecipeError, TrainingDiverged, reading
from pipeline.core.io import atomic_dir, read_json, sha256_file, write_json
from pipeline.core.order import PublishedOrder
from pipeline.core.paths import OUT as STAGE_OUT, final_dir
from pipeline.core.provenance import provenance
from pipeline.core.integrity import confine, seal, verify_model_dir
from pipeline.core.schedule import lr_factor
from pipeline.ingest import read_documents
from pipeline.sources import arithmetic, decode_text, hub_or_local
from pipeline.tokenize import split_documents
from pipeline.tokenizer import IM_END

PRETRAIN_DIR = final_dir("pretrain")
INGEST_DIR = STAGE_OUT["ingest"]
BLEND_DIR, TOKENIZE_DIR = STAGE_OUT["blend"], STAGE_OUT["tokenize"]
OUT = STAGE_OUT["posttrain"]
IGNORE = -100  # label of tokens the loss does not cover
# the gradient norm SFT and DPO clip to; a constant, not a recipe key: a new key would change every
# recipe's hash (and so every stage output's provenance), and this must stay a pure refactor
GRAD_CLIP = 1.0


@dataclass
class Example:
    """One tokenized conversation: `labels[i]` is `input_ids[i]` on assistant tokens, else IGNORE."""
    input_ids: list[int]
    labels: list[int]


# --------------------------------------------------------------------------- data


def _builtin_source(recipe: Recipe, builtin: str) -> str:
    manifest = load_manifest(recipe.data.manifest)
    for s in manifest.sources:
        if s.kind == "builtin" and s.builtin == builtin:
            return s.name
    raise RecipeError(recipe.data.manifest, "sources",
                      f"posttrain needs a `builtin: {builtin}` source in the data manifest")


def _training_docs(recipe: Recipe, builtin: str, ingest_dir: Path) -> list[str]:
    """Ingested documents of a builtin source, minus the tokenize stage's held-out documents."""
    name = _builtin_source(recipe, builtin)
    if not (ingest_dir / name).is_dir():
        raise PipelineError(f"{ingest_dir / name}: not found; run the ingest stage first")
    train, _val = split_documents(read_documents(name, ingest_dir), recipe.tokenize.val_per_mille)
    return train


QA_LINE = re.compile(r"Q: (What is -?\d+ [-+*] -?\d+\?)\nA: (-?\d+)\n")


def arithmetic_pairs(docs: list[str]) -> list[tuple[str, str]]:
    """(question, answer) pairs from synthetic-arithmetic training documents, first occurrence kept."""
    seen, out = set(), []
    for d in docs:
        for q, a in QA_LINE.findall(d):
            if q not in seen:
                seen.add(q)
                out.append((q, a))
    return out


def docs_pairs(docs: list[str], max_chars: int) -> list[tuple[str, str]]:
    """(question about a topic, its first paragraph) from python-docs documents ("name\\n\\ntext")."""
    out = []
    for d in docs:
        name, _, body = d.partition("\n\n")
        paras = [p.strip() for p in body.split("\n\n") if p.strip() and not set(p.strip()) <= set("*=-")]
        if not name.strip() or not paras:
            continue
        answer = paras[0]
        if len(answer) > max_chars:
            answer = answer[:max_chars].rsplit(" ", 1)[0]
        out.append((f"What does the Python documentation say about `{name.strip()}`?", answer))
    return out


def chat(question: str, answer: str | None = None) -> list[dict]:
    msgs = [{"role": "user", "content": question}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def _check_messages(msgs, where: str) -> list[dict]:
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs):
        raise PipelineError(f"{where}: expected a list of {{role, content}} messages")
    if not any(m["role"] == "assistant" for m in msgs):
        raise PipelineError(f"{where}: conversation has no assistant turn")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def messages_from_dataset(ds, field: str, where: str) -> list[list[dict]]:
    """Conversations from a `datasets` split in the messages format (hub sets and local files alike)."""
    if field not in ds.column_names:
        raise PipelineError(f"{where}: no column `{field}` (columns: {', '.join(ds.column_names)})")
    return [_check_messages(row, f"{where} row {i}") for i, row in enumerate(ds[field])]


def _load_messages(src: SFTSourceCfg, allow_paths=(), rfile: str = "<recipe>") -> list[list[dict]]:
    import datasets   # heavy; only for SFT sources read from files or the hub

    if src.kind == "local":
        files = []
        for p in src.paths:
            confine(p.split("*")[0] or ".", f"{rfile}: posttrain.sft.paths", allow_paths)
            found = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
            if not found or not all(Path(f).is_file() for f in found):
                raise PipelineError(f"posttrain.sft: local file {p} not found")
            for f in found:  # globs and symlinks may lead elsewhere; text must be UTF-8
                confine(f, f"{rfile}: posttrain.sft.paths", allow_paths)
                decode_text(Path(f).read_bytes(), f)
            files += [str(f) for f in found]
        with reading(", ".join(files), "cannot load as JSON lines"):
            ds = datasets.load_dataset("json", data_files=files, split="train")
        where = ", ".join(files)
    else:
        hub_or_local(src.repo_id, f"{rfile}: posttrain.sft.repo_id", allow_paths)
        with reading(f"{rfile}: posttrain.sft.repo_id {src.repo_id}@{src.revision}", "cannot load"):
            ds = datasets.load_dataset(src.repo_id, revision=src.revision, split=src.split)
        where = f"{src.repo_id}@{src.revision}"
    return messages_from_dataset(ds, src.messages_field, where)


def sft_conversations(recipe: Recipe, ingest_dir: Path = INGEST_DIR) -> list[list[dict]]:
    """Every SFT conversation of the recipe, each source capped at max_examples, in a seeded order."""
    cfg = recipe.posttrain
    convs = []
    for i, src in enumerate(cfg.sft):
        if src.kind == "builtin" and src.builtin == "arithmetic-qa":
            items = [chat(q, a) for q, a in arithmetic_pairs(_training_docs(recipe, "synthetic-arithmetic", ingest_dir))]
        elif src.kind == "builtin":
            items = [chat(q, a) for q, a in docs_pairs(_training_docs(recipe, "python-docs", ingest_dir),
                                                      cfg.answer_max_chars)]
        else:
            items = _load_messages(src, recipe.allow_paths, recipe_path(recipe))
        random.Random(f"{posttrain_seed(recipe)}-sft-source-{i}").shuffle(items)
        convs += items[:src.max_examples]
    random.Random(f"{posttrain_seed(recipe)}-sft").shuffle(convs)
    return convs


def replay_examples(n: int, max_len: int, seed: int, blend_dir: Path = BLEND_DIR,
                    tokenize_dir: Path = TOKENIZE_DIR) -> tuple[list[Example], str | None]:
    """`n` seeded rows of the published pretraining order (hashes checked), each cut to `max_len`
    tokens, labelled on every token: pretraining text replayed during SFT. Returns the examples and
    the sha256 of the blend.json they came from."""
    if n == 0:
        return [], None

    order = PublishedOrder(blend_dir, tokenize_dir)
    rows = random.Random(f"{seed}-replay").sample(range(len(order.indices)), min(n, len(order.indices)))
    out = []
    for r in rows:
        ids = [int(t) for t in order.instance(r)[:max_len]]
        out.append(Example(ids, list(ids)))
    return out, sha256_file(blend_dir / "blend.json")


def posttrain_seed(recipe: Recipe) -> int:
    return recipe.seed if recipe.posttrain.seed is None else recipe.posttrain.seed


# --------------------------------------------------------------------------- tokenization + masking


def tokenize_conversation(tok, messages: list[dict], max_len: int) -> Example:
    """Render with the tokenizer's chat template; labels cover only the assistant turns.

    The rendered text is cut into pieces at message boundaries (render of messages[:i] with the
    generation prompt marks where assistant content starts): the pieces concatenate to exactly the
    full render, and each assistant piece (its content and closing tag) is the only part with labels.
    """
    ids, labels, done = [], [], ""
    for i, m in enumerate(messages):
        full = tok.apply_chat_template(messages[:i + 1], tokenize=False)
        if m["role"] == "assistant":
            head = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            if not head.startswith(done) or not full.startswith(head):
                raise PipelineError("chat template is not prefix-stable; cannot mask assistant tokens")
            prompt_ids = tok.encode(head[len(done):], add_special_tokens=False)
            answer_ids = tok.encode(full[len(head):], add_special_tokens=False)
            ids += prompt_ids + answer_ids
            labels += [IGNORE] * len(prompt_ids) + answer_ids
        else:
            part = tok.encode(full[len(done):], add_special_tokens=False)
            ids += part
            labels += [IGNORE] * len(part)
        done = full
    return Example(ids[:max_len], labels[:max_len])


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (IGNORE on padding)."""
    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for r, e in enumerate(examples):
        ids[r, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[r, :len(e.labels)] = torch.tensor(e.labels)
        mask[r, :len(e.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_logprobs(model, batch: dict, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of log p(label) over labelled tokens, and the count of those tokens."""
    batch = {k: v.to(model.device) for k, v in batch.items()}
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    with device_autocast(model.device, precision):
        # the output head only where a label is scored: an SFT row is mostly prompt and padding, and
        # the head (vocab x hidden) is ~40% of a small model's compute
        hidden = model.get_decoder()(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).last_hidden_state[:, :-1]
        logits = model.get_output_embeddings()(hidden[keep])
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[keep].unsqueeze(-1)).squeeze(-1)
    lp = torch.zeros(labels.shape, dtype=picked.dtype, device=picked.device).masked_scatter(keep, picked)
    return lp.sum(-1), keep.sum(-1)


# --------------------------------------------------------------------------- training


def _batches(n_items: int, batch_size: int, steps: int, seed: str):
    """Index batches for `steps` steps: seeded permutations of range(n_items), epoch after epoch."""
    rng, order = random.Random(seed), []
    for _ in range(steps):
        while len(order) < batch_size:
            perm = list(range(n_items))
            rng.shuffle(perm)
            order += perm
        yield order[:batch_size]
        order = order[batch_size:]


def length_groups(lengths: list[int], overhead: int = 256) -> list[list[int]]:
    """Positions 0..B-1 of a batch in at most two groups of similar length (sorted, cut where the
    padded tokens plus a per-forward `overhead` are fewest): SFT rows range from ~20 tokens (an
    arithmetic turn) to the 128-token cap (replayed text, docs), and padding every row to the longest
    made ~2x the compute. Deterministic: ties keep batch order."""
    order = sorted(range(len(lengths)), key=lambda j: (lengths[j], j))
    sl = [lengths[j] for j in order]
    best, cut = len(sl) * sl[-1], 0
    for k in range(1, len(sl)):
        cost = k * sl[k - 1] + (len(sl) - k) * sl[-1] + overhead
        if cost < best:
            best, cut = cost, k
    return [order[:cut], order[cut:]] if cut else [order]


def check_finite(loss: float, model, phase: str, step: int) -> None:
    """Pretraining's guard for SFT and DPO: a NaN/inf loss, or a weight made NaN/inf by the update,
    stops the stage naming the step (before anything is written)."""
    if not math.isfinite(loss):
        raise TrainingDiverged(f"posttrain.{phase}: non-finite loss ({loss}) at step {step}; nothing written "
                               f"(lower posttrain{'.dpo' if phase == 'dpo' else ''}.lr?)")
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise TrainingDiverged(f"posttrain.{phase}: weight {name} became non-finite at step {step}; "
                                   "nothing written")


def sft(model, tok, examples: list[Example], cfg, seed: int, on_step=None) -> list[float]:
    """Train on the assistant tokens (mean over labelled tokens of the batch); returns per-step loss.
    `on_step(n, model)` after each update n (1-based)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg.steps, cfg.warmup_steps))   # cosine to 0 after warm-up
    model.train()
    losses = []
    for idx in tqdm(_batches(len(examples), cfg.batch_size, cfg.steps, f"{seed}-sft-order"),
                    total=cfg.steps, desc="sft", mininterval=2):
        # the same batch, cut into length groups: each group is padded only to its own longest row,
        # and the summed per-group losses over the batch's labelled-token count are the batch's loss
        groups = length_groups([len(examples[i].input_ids) for i in idx])
        count = sum(sum(label != IGNORE for label in examples[idx[j]].labels[1:]) for g in groups for j in g)
        total = 0.0
        for g in groups:
            lp, _ = token_logprobs(model, collate([examples[idx[j]] for j in g], tok.pad_token_id), cfg.precision)
            part = -lp.sum() / max(count, 1)
            part.backward()
            total += part.item()
        loss = torch.tensor(total)
        check_finite(loss.item(), model, "sft", len(losses))
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(len(losses), model)
    check_finite(losses[-1] if losses else 0.0, model, "sft", len(losses))
    model.eval()
    return losses


def preference_pairs(recipe: Recipe, ingest_dir: Path = INGEST_DIR) -> list[tuple[list[dict], str, str]]:
    """(prompt messages, chosen answer, rejected answer): a correct vs an incorrect arithmetic answer.

    Only training-split problems; the wrong answer is off by a small seeded nonzero amount, the
    kind of near miss a small model makes.
    """
    rng = random.Random(f"{posttrain_seed(recipe)}-dpo-pairs")
    pairs = arithmetic_pairs(_training_docs(recipe, "synthetic-arithmetic", ingest_dir))
    rng.shuffle(pairs)
    out = []
    for q, a in pairs[:recipe.posttrain.dpo.pairs]:
        wrong = int(a) + rng.choice([-10, -2, -1, 1, 2, 10])
        out.append((chat(q), a, str(wrong)))
    return out


def dpo(model, tok, pairs, cfg, max_len: int, seed: int, precision: str = "fp32") -> list[dict]:
    """Direct preference optimization (Rafailov et al. 2023) against a frozen copy of the SFT model."""
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    chosen = [tokenize_conversation(tok, p + [{"role": "assistant", "content": c}], max_len) for p, c, _ in pairs]
    rejected = [tokenize_conversation(tok, p + [{"role": "assistant", "content": r}], max_len) for p, _, r in pairs]
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    model.train()
    log = []
    for idx in tqdm(_batches(len(pairs), cfg.batch_size, cfg.steps, f"{seed}-dpo-order"),
                    total=cfg.steps, desc="dpo", mininterval=2):
        # chosen and rejected in one batch: rows [0, B) chosen, [B, 2B) rejected
        batch = collate([chosen[i] for i in idx] + [rejected[i] for i in idx], tok.pad_token_id)
        lp, _ = token_logprobs(model, batch, precision)
        with torch.no_grad():
            ref_lp, _ = token_logprobs(ref, batch, precision)
        b = len(idx)
        margin = cfg.beta * ((lp[:b] - ref_lp[:b]) - (lp[b:] - ref_lp[b:]))
        loss = -F.logsigmoid(margin).mean()
        check_finite(loss.item(), model, "dpo", len(log))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.append({"loss": loss.item(), "reward_accuracy": (margin > 0).float().mean().item()})
    check_finite(log[-1]["loss"] if log else 0.0, model, "dpo", len(log))
    model.eval()
    return log


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def greedy_answers(model, tok, prompts: list[str], max_new_tokens: int = 8, batch_size: int = 32) -> list[str]:
    """Greedy continuations of each prompt (text up to the first <|im_end|> or newline)."""
    stop = [t for t in (tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id) if t is not None]
    side = tok.padding_side
    tok.padding_side = "left"
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(model.device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=stop)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                text = tok.decode(row, skip_special_tokens=False)
                out.append(re.split(r"<\|im_end\|>|<\|endoftext\|>|<\|pad\|>|\n", text)[0].strip())
    finally:
        tok.padding_side = side
    return out


def arithmetic_em(model, tok, problems, chat_format: bool) -> float:
    """Exact match of greedy answers on (a, op, b) problems, in chat or pretraining (Q:/A:) format."""
    if chat_format:
        prompts = [tok.apply_chat_template(chat(arithmetic.question(*p)), tokenize=False, add_generation_prompt=True)
                   for p in problems]
    else:
        prompts = [f"Q: {arithmetic.question(*p)}\nA:" for p in problems]
    got = greedy_answers(model, tok, prompts)
    return sum(g == str(arithmetic.answer(*p)) for g, p in zip(got, problems)) / max(1, len(problems))


def heldout_arithmetic(recipe: Recipe, n: int):
    manifest = load_manifest(recipe.data.manifest)
    src = manifest.source(_builtin_source(recipe, "synthetic-arithmetic"))
    return arithmetic.heldout_problems(src.arithmetic, n)


# --------------------------------------------------------------------------- stage


def load_model(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer   # heavy; only when the stage runs

    if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
        raise CheckpointError(f"{model_dir}: no config.json + model.safetensors; run the pretrain stage first")
    verify_model_dir(model_dir)  # weights, config and tokenizer as the pretrain stage recorded them
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, use_safetensors=True)
    # local_files_only fixed, not taken from HF_HUB_OFFLINE: transformers saves it in tokenizer_config.json
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if tok.chat_template is None:
        raise CheckpointError(f"{model_dir}: tokenizer has no chat template")
    return model.eval(), tok


def run(recipe: Recipe, pretrain_dir: Path = PRETRAIN_DIR, ingest_dir: Path = INGEST_DIR,
        out_dir: Path = OUT, blend_dir: Path = BLEND_DIR, tokenize_dir: Path = TOKENIZE_DIR) -> dict:
    cfg, seed = recipe.posttrain, posttrain_seed(recipe)
    torch.manual_seed(seed)
    numerics.enter_recipe(recipe, "posttrain")   # checks the pins; the same threads in-process as under `omp`
    model, tok = load_model(pretrain_dir)
    model.to(resolve_device(cfg.device, getattr(recipe, "_path", "<recipe>"), "posttrain.device"))
    parent = sha256_file(pretrain_dir / "model.safetensors")
    problems = heldout_arithmetic(recipe, cfg.eval_problems)

    metrics = {"arith_eval_problems": len(problems),
               "arith_em_before": arithmetic_em(model, tok, problems, chat_format=False),
               "arith_em_before_chat": arithmetic_em(model, tok, problems, chat_format=True)}

    convs = sft_conversations(recipe, ingest_dir)
    if not convs:
        raise PipelineError("posttrain.sft: no conversations (check the sources)")
    examples = [tokenize_conversation(tok, c, cfg.max_len_tokens) for c in convs]
    examples = [e for e in examples if any(l != IGNORE for l in e.labels[1:])]
    first: dict = {}   # the weights after post-training's first step: the ladder's first post-training rung

    def keep_first(n, m):
        if n == 1 and cfg.ladder:
            first.update({k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()})
    replay, blend_sha = replay_examples(cfg.replay_examples, cfg.max_len_tokens, seed, blend_dir, tokenize_dir)
    sft_losses = sft(model, tok, examples + replay, cfg, seed, on_step=keep_first)
    metrics.update(sft_examples=len(examples), sft_replay_examples=len(replay), sft_steps=cfg.steps,
                   sft_loss_first=sft_losses[0], sft_loss_last=sft_losses[-1])
    metrics["arith_em_after_sft"] = arithmetic_em(model, tok, problems, chat_format=True)

    if cfg.dpo.enabled:
        log = dpo(model, tok, preference_pairs(recipe, ingest_dir), cfg.dpo, cfg.max_len_tokens, seed, cfg.precision)
        tail = log[-10:]
        metrics.update(dpo_steps=cfg.dpo.steps, dpo_loss_first=log[0]["loss"], dpo_loss_last=log[-1]["loss"],
                       dpo_reward_accuracy_last10=sum(x["reward_accuracy"] for x in tail) / len(tail))
    metrics["arith_em_after"] = arithmetic_em(model, tok, problems, chat_format=True)

    inputs = {"pretrain_model": parent, "ingest": sha256_file(ingest_dir / "ingest.json")}
    if blend_sha:
        inputs["blend"] = blend_sha
    chat_ready(model, tok)
    with atomic_dir(out_dir) as tmp:
        final = tmp / "final"
        model.save_pretrained(str(final), safe_serialization=True)
        tok.save_pretrained(str(final))
        write_json(final / "lineage.json", {
            "stage": "posttrain", "parent": {"path": str(pretrain_dir), "sha256": parent},
            "model_sha256": sha256_file(final / "model.safetensors"),
            "pretrain_lineage": _maybe_json(pretrain_dir / "lineage.json")})
        write_json(tmp / "metrics.json", metrics)
        if cfg.ladder and first:
            write_rungs(model, tok, first, tmp / "ladder", pretrain_dir, parent,
                        cfg.steps + (cfg.dpo.steps if cfg.dpo.enabled else 0))
        else:   # the folder is there either way (later stages list it as a dependency)
            write_json(tmp / "ladder" / "ladder.json", {"rungs": []})
        seal(tmp, provenance("posttrain", recipe, inputs,
                                                       model_sha256=sha256_file(final / "model.safetensors")))
    return metrics


def write_rungs(model, tok, first: dict, root: Path, pretrain_dir: Path, parent: str, total: int) -> list[dict]:
    """Post-training's first and last step as ladder rungs (pipeline/core/ladder.py), numbered on from the
    last pretraining step, so the chain of rungs runs on from the pretrained weights (`parent`) to the
    released model; rows_consumed / tokens_seen stay those of pretraining (the published order)."""
    pre = _maybe_json(pretrain_dir / "lineage.json") or {}
    if "step" not in pre:   # a pretrain output without its step: no ladder to continue
        write_json(root / "ladder.json", {"rungs": []})
        return []
    base = {"stage": "posttrain", "rows_consumed": pre["rows_consumed"], "tokens_seen": pre["tokens_seen"]}
    start = copy.deepcopy(model).cpu()
    start.load_state_dict(first)
    a = ladder.write_rung(start, root, {**base, "step": pre["step"] + 1, "stage_step": 1, "parent_sha256": parent},
                          tokenizer=tok)
    out = [a]
    if total > 1:
        out.append(ladder.write_rung(model, root, {**base, "step": pre["step"] + total, "stage_step": total,
                                                   "parent_sha256": a["sha256"]}, tokenizer=tok))
    write_json(root / ladder.SUMMARY, {"rungs": [{k: v for k, v in r.items() if k != "files"} for r in out]})
    return out


def chat_ready(model, tok) -> None:
    """A chat model people can use as is: generation stops at the end of the assistant turn
    (<|im_end|>, and <|endoftext|> still), and the tokenizer's limit is the model's positions."""
    im_end = tok.convert_tokens_to_ids(IM_END)
    if im_end is None or im_end == tok.unk_token_id:
        raise CheckpointError(f"tokenizer has no {IM_END} token: the chat template cannot end a turn")
    model.generation_config.eos_token_id = [im_end] + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    model.generation_config.pad_token_id = tok.pad_token_id
    tok.model_max_length = model.config.max_position_embeddings


def _maybe_json(path: Path):
    return read_json(path) if path.is_file() else None
