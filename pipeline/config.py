"""Typed recipes and data manifests, checked at the door.

A recipe (`recipes/<name>.yaml`) holds every parameter of one experiment chain. It is validated
on load: an unknown key, a wrong type or an impossible value raises RecipeError naming the file
and the key path (e.g. `recipes/tiny.yaml: blend.seq_len: must be > 0`), before any work starts.

A recipe may start from another with `base: other.yaml` (path relative to the recipe): the base
is loaded first and the recipe's keys are merged over it, section by section.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, ValidationError,
                      field_validator, model_validator)

from pipeline.errors import RecipeError
from pipeline.io import canonical_json, sha256_bytes


class Strict(BaseModel):
    # no NaN or infinity in any float; ints and bools are strict (below): `true` is not the integer 1
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _not_bool(v):
    if isinstance(v, bool):
        raise ValueError("a boolean is not a number")
    return v


Float = Annotated[float, BeforeValidator(_not_bool)]  # YAML reads 1e-3 as a string: still parsed
PosInt = Annotated[StrictInt, Field(gt=0)]
NonNegInt = Annotated[StrictInt, Field(ge=0)]
SafeName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=128)]
Beta = Annotated[Float, Field(ge=0, lt=1)]

# --------------------------------------------------------------------------- data manifest


class LanguageStep(Strict):
    """Keep a document when py3langid's most likely language is one of `languages` with at least
    `min_score` (normalized probability), scored on its first `score_chars` characters."""
    kind: Literal["language"]
    languages: Annotated[list[str], Field(min_length=1)] = ["en"]
    min_score: Annotated[Float, Field(ge=0, le=1)] = 0.5
    score_chars: PosInt = 20_000


class QualityStep(Strict):
    """Heuristic quality rules after Gopher (Rae et al. 2021, appendix A.1.1); null turns a rule off.
    Words are whitespace-separated; a document failing any rule is removed."""
    kind: Literal["quality"]
    min_words: NonNegInt | None = 50
    max_words: PosInt | None = 100_000
    min_mean_word_chars: Annotated[Float, Field(ge=0)] | None = 3.0
    max_mean_word_chars: Annotated[Float, Field(gt=0)] | None = 10.0
    max_symbol_word_ratio: Annotated[Float, Field(ge=0)] | None = 0.1      # '#' and '...' per word
    max_ellipsis_line_ratio: Annotated[Float, Field(ge=0, le=1)] | None = 0.3
    max_bullet_line_ratio: Annotated[Float, Field(ge=0, le=1)] | None = 0.9
    min_alpha_word_ratio: Annotated[Float, Field(ge=0, le=1)] | None = 0.8  # words with a letter
    min_stopwords: NonNegInt | None = 2   # of: the be to of and that have with


# A filter step is one of these models (discriminated by `kind`) plus a builder registered under the
# same kind in pipeline/sources/filters.py: that pair is all a new step needs.
FilterStep = Annotated[Union[LanguageStep, QualityStep], Field(discriminator="kind")]


class NearDedup(Strict):
    """MinHash near-duplicate removal (Broder 1997) with LSH banding: documents whose estimated
    Jaccard similarity of word `ngram`-shingles is >= threshold are one cluster; the one with the
    smallest sha256 of its text survives, whatever the order or the worker count."""
    threshold: Annotated[Float, Field(gt=0, le=1)] = 0.8
    num_perm: Annotated[StrictInt, Field(ge=16, le=1024)] = 128
    ngram: PosInt = 5
    seed: StrictInt = 1


class Filters(Strict):
    min_chars: NonNegInt = 1
    max_chars: PosInt | None = None
    steps: list[FilterStep] = []  # per-document steps after the length filter, in this order
    dedup: StrictBool = True  # drop exact duplicate documents (first one kept)
    near_dedup: NearDedup | None = None  # after exact dedup

    @field_validator("steps")
    @classmethod
    def _unique_steps(cls, v):
        kinds = [s.kind for s in v]
        dup = sorted({k for k in kinds if kinds.count(k) > 1})
        if dup:
            raise ValueError(f"each step kind at most once (repeated: {', '.join(dup)})")
        return v


class SourceBase(Strict):
    name: SafeName
    license: Annotated[str, Field(min_length=1)]
    weight: Annotated[Float, Field(gt=0)]
    filters: Filters = Filters()
    max_docs: PosInt | None = None
    max_bytes: PosInt | None = None
    seed: StrictInt = 0  # order in which documents are taken before max_docs / max_bytes apply


class ArithmeticOptions(Strict):
    docs: PosInt = 2000
    problems_per_doc: PosInt = 8
    max_operand: PosInt = 99
    ops: list[Literal["+", "-", "*"]] = ["+", "-", "*"]
    heldout_per_mille: Annotated[StrictInt, Field(ge=1, le=500)] = 100

    @field_validator("ops")
    @classmethod
    def _ops_nonempty(cls, v):
        if not v:
            raise ValueError("at least one operator is required")
        return v


class BuiltinSource(SourceBase):
    kind: Literal["builtin"]
    builtin: Literal["python-docs", "python-code", "synthetic-arithmetic"]
    arithmetic: ArithmeticOptions = ArithmeticOptions()


class HFSource(SourceBase):
    kind: Literal["hf"]
    repo_id: Annotated[str, Field(min_length=1)]
    revision: Annotated[str, Field(min_length=1)]  # a commit sha or tag: hub data is pinned
    split: str = "train"
    config_name: str | None = None
    text_field: str = "text"


class LocalSource(SourceBase):
    kind: Literal["local"]
    paths: Annotated[list[str], Field(min_length=1)]  # files or globs, relative to the repo root
    format: Literal["text", "jsonl"] = "text"
    text_field: str = "text"


Source = Annotated[Union[BuiltinSource, HFSource, LocalSource], Field(discriminator="kind")]


class Manifest(Strict):
    name: str
    # local sources read files inside the project only, unless their folder is listed here on purpose
    allow_paths: list[str] = []
    description: str = ""
    sources: Annotated[list[Source], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique_names(self):
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate source names: {', '.join(dup)}")
        return self

    def source(self, name: str):
        return next(s for s in self.sources if s.name == name)

    @property
    def target_shares(self) -> dict[str, float]:
        total = sum(s.weight for s in self.sources)
        return {s.name: s.weight / total for s in self.sources}


# --------------------------------------------------------------------------- recipe sections


class DataCfg(Strict):
    manifest: str = "data_manifests/tiny.yaml"
    lock: StrictBool = True  # verify ingested content against data_manifests/<mix>.lock.json
    # where ingest and tokenize run their units of work; the output is byte-identical either way
    executor: Literal["local", "ray"] = "local"
    workers: PosInt | None = None      # ray: units at once (None: every CPU of the Ray cluster)
    ray_address: str | None = None     # ray: a cluster to join (None: $RAY_ADDRESS, else a local Ray)
    unit_docs: PosInt = 1000           # ingest: raw documents per unit of work (hub sources: one shard)


class TokenizerCfg(Strict):
    vocab_size: Annotated[StrictInt, Field(ge=300, le=1_000_000)] = 4096
    min_frequency: PosInt = 2
    sample_bytes: PosInt = 2_000_000  # bytes of text drawn from the mixture to train BPE
    pretrained_dir: str | None = None  # use this tokenizer directory instead of training one


class TokenizeCfg(Strict):
    val_per_mille: Annotated[StrictInt, Field(ge=1, le=500)] = 20  # documents held out per source
    batch_docs: PosInt = 512
    # Training decontamination: every training window of `decontaminate_ngram` tokens that equals an
    # n-gram of an item of the local lm-eval tasks in this directory is cut out (None: off). Use the
    # same n as evaluate.contamination_ngram: then the contamination report shows zero by construction.
    decontaminate_tasks: str | None = "evals/tasks"
    decontaminate_ngram: PosInt = 13


class BlendCfg(Strict):
    seq_len: PosInt = 256
    global_batch_size: PosInt = 16
    tokens: PosInt = 1_000_000  # training token budget; steps = tokens // (batch * seq_len)
    seed: StrictInt | None = None  # defaults to the recipe seed


# --- low-communication training (pretrain.distributed): shared by the trainer and pipeline/lowcomm


class OuterCompressionCfg(Strict):
    # sign: 1 bit + a scale per block; int2: 2 bits, levels +-1/+-3 x scale (SparseLoCo's, for top-k values)
    kind: Literal["none", "fp16", "int8", "int4", "int2", "sign"] = "none"
    block_size: PosInt = 64          # elements per quantization block (one scale each)
    topk_fraction: Annotated[Float, Field(gt=0, le=1)] | None = None  # keep this fraction of entries
    # chunked top-k: keep ceil(chunk * fraction) per chunk, positions as int16 offsets (2 bytes, not 4)
    topk_chunk: Annotated[StrictInt, Field(ge=1, le=32768)] | None = None

    @model_validator(mode="after")
    def _chunk_needs_a_fraction(self):
        if self.topk_chunk is not None and self.topk_fraction is None:
            raise ValueError("topk_chunk needs topk_fraction (the fraction kept in each chunk)")
        return self
    error_feedback: StrictBool = True      # add the residual to the next pseudo-gradient
    # SparseLoCo's recipe (Sarfi et al. 2025): the residual decays by this factor before the next
    # pseudo-gradient is added (e <- decay * e + delta); and the mean of top-k messages divides each
    # entry by the workers that sent it ("contributors"), not by all workers. Left out of the
    # resolved recipe at their defaults (1.0, "workers": the plain method), so recipes keep their hash.
    error_feedback_decay: Annotated[Float, Field(gt=0, le=1)] = Field(1.0, exclude_if=lambda v: v == 1.0)
    mean_over: Literal["workers", "contributors"] = Field("workers", exclude_if=lambda v: v == "workers")

    @model_validator(mode="after")
    def _contributors_need_topk(self):
        if self.mean_over == "contributors" and self.topk_fraction is None:
            raise ValueError("mean_over: contributors needs topk_fraction (without top-k every worker "
                             "sends every entry)")
        return self


class DiLoCoCfg(Strict):
    inner_steps: PosInt = 50         # H: inner AdamW steps between outer syncs
    outer_lr: Annotated[Float, Field(gt=0)] = 0.7          # Douillard et al. 2023 defaults
    outer_momentum: Annotated[Float, Field(ge=0, lt=1)] = 0.9
    nesterov: StrictBool = True
    warmup_sync_steps: NonNegInt = 0  # synchronous (ddp) steps before the first inner phase
    fragments: PosInt = 1            # streaming DiLoCo: sync 1/F of the parameters at a time
    # inner optimizer: the recipe's AdamW, or plain SGD at its lr (the DiLoCo == DDP sanity anchor)
    inner_optimizer: Literal["default", "sgd"] = "default"
    compression: OuterCompressionCfg = OuterCompressionCfg()
    # the trainer also checkpoints right after every outer sync (θ_global, outer momentum, error
    # feedback, step = data cursor): a restart then loses at most H steps, whatever checkpoint_every_steps
    checkpoint_every_sync: StrictBool = True


class DeMoCfg(Strict):
    chunk_size: PosInt = 64          # DCT chunk length (elements)
    topk: PosInt = 8                 # components exchanged per chunk
    momentum_decay: Annotated[Float, Field(ge=0, lt=1)] = 0.999
    sign: StrictBool = True                # apply sign of the decoded update (as in the paper)


class TorchFTCfg(Strict):
    """engine torchft: where the Lighthouse is and how long torchft waits (execution only: not hashed)."""
    # http://host:port of a Lighthouse started by `omp lighthouse` (None: `omp pretrain` starts its own
    # on this host; the env var TORCHFT_LIGHTHOUSE, torchft's own, overrides both)
    lighthouse: str | None = None
    min_replicas: PosInt = 1         # a round needs at least this many replica groups
    timeout_seconds: Annotated[Float, Field(gt=0)] = 10.0          # collectives and heal transfers
    quorum_timeout_seconds: Annotated[Float, Field(gt=0)] = 60.0   # waiting for the next quorum
    heartbeat_timeout_ms: PosInt = 2000   # the Lighthouse it starts: a silent replica leaves the quorum after this
    join_timeout_ms: PosInt = 2000        # ... and waits this long for more replicas to join a quorum
    max_restarts: NonNegInt = 3      # `omp pretrain` restarts a replica that died, this many times each


class NodesCfg(Strict):
    """Several machines (execution only: not hashed). torchrun's c10d rendezvous assigns node ranks;
    engine deepspeed may use DeepSpeed's own launcher with a hostfile instead."""
    nnodes: PosInt = 1               # machines; world_size is the total number of workers over all of them
    rdzv_endpoint: str | None = None  # host:port every node reaches (torchrun --rdzv-endpoint); needed if nnodes > 1
    rdzv_id: SafeName = "omp"        # names the job at the rendezvous (the same on every node)
    hostfile: str | None = None      # engine deepspeed: launch with `deepspeed --hostfile` (pdsh/ssh) instead of torchrun
    master_port: Annotated[StrictInt, Field(ge=1, le=65535)] = 29500   # with hostfile: DeepSpeed's master port

    def world_size_per_node(self, world_size: int) -> int | None:
        return world_size // self.nnodes if world_size % self.nnodes == 0 else None

    @model_validator(mode="after")
    def _check(self):
        if self.nnodes > 1 and self.rdzv_endpoint is None and self.hostfile is None:
            raise ValueError("nnodes > 1 needs rdzv_endpoint (host:port of the rendezvous) or hostfile")
        if self.rdzv_endpoint is not None and not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+:\d{1,5}", self.rdzv_endpoint):
            raise ValueError(f"rdzv_endpoint {self.rdzv_endpoint!r} is not host:port")
        return self


class DistributedCfg(Strict):
    mode: Literal["ddp", "diloco", "demo"] = "ddp"
    world_size: PosInt = 1           # 1 runs in-process; >1 launches torchrun (or deepspeed, or torchft replicas)
    # torchrun: torch.distributed workers; deepspeed: ZeRO inside them; torchft: one fault-tolerant
    # replica group (process) per worker, DiLoCo rounds committed by a torchft Lighthouse quorum
    engine: Literal["torchrun", "deepspeed", "torchft"] = "torchrun"
    zero_stage: Annotated[StrictInt, Field(ge=0, le=3)] = 2   # with engine: deepspeed
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    diloco: DiLoCoCfg = DiLoCoCfg()
    demo: DeMoCfg = DeMoCfg()
    torchft: TorchFTCfg = TorchFTCfg()
    nodes: NodesCfg = NodesCfg()
    # hybrid layout (mode diloco, engine torchrun): world_size/islands workers per island train data
    # parallel (a gradient all-reduce every step inside the island), DiLoCo across the islands.
    # Left out of the resolved recipe at its default, so recipes without it keep their hash.
    islands: PosInt = Field(1, exclude_if=lambda v: v == 1)

    @model_validator(mode="after")
    def _check(self):
        if self.engine == "torchft" and self.mode != "diloco":
            raise ValueError(f"engine torchft trains DiLoCo rounds: mode must be diloco, not {self.mode!r}")
        if self.engine == "torchft" and self.nodes.nnodes > 1:
            raise ValueError("engine torchft does not use nodes: start `omp pretrain --replica-ids ...` on each "
                             "host against one Lighthouse (see README)")
        if self.nodes.world_size_per_node(self.world_size) is None:
            raise ValueError(f"world_size {self.world_size} does not split over nodes.nnodes {self.nodes.nnodes}")
        if self.nodes.hostfile is not None and self.engine != "deepspeed":
            raise ValueError("nodes.hostfile is for engine deepspeed (torchrun uses nodes.rdzv_endpoint)")
        if self.islands > 1:
            if self.mode != "diloco" or self.engine != "torchrun":
                raise ValueError(f"islands > 1 is DDP inside islands and DiLoCo across them: it needs mode "
                                 f"diloco and engine torchrun (got {self.mode}, {self.engine})")
            if self.world_size % self.islands:
                raise ValueError(f"world_size {self.world_size} does not split into {self.islands} islands")
        return self


# --- post-training (pipeline/posttrain.py)


class SFTSourceCfg(Strict):
    """One SFT data source. `builtin` builds chat pairs from an ingested source of the data
    manifest; `local` / `hf` read conversations in the messages format ([{role, content}, ...])."""
    kind: Literal["builtin", "local", "hf"]
    builtin: Literal["arithmetic-qa", "python-docs-qa"] | None = None
    paths: list[str] = []              # kind local: jsonl/json files (relative to the repo root)
    repo_id: str | None = None         # kind hf: pinned hub dataset
    revision: str | None = None
    split: str = "train"
    messages_field: str = "messages"
    max_examples: PosInt | None = None

    @model_validator(mode="after")
    def _kind_fields(self):
        if self.kind == "builtin" and self.builtin is None:
            raise ValueError("kind builtin needs `builtin: arithmetic-qa | python-docs-qa`")
        if self.kind == "local" and not self.paths:
            raise ValueError("kind local needs `paths`")
        if self.kind == "hf" and not (self.repo_id and self.revision):
            raise ValueError("kind hf needs `repo_id` and `revision` (hub data is pinned)")
        return self


class DPOCfg(Strict):
    enabled: StrictBool = True
    steps: PosInt = 60
    batch_size: PosInt = 16
    lr: Annotated[Float, Field(gt=0)] = 5e-5
    beta: Annotated[Float, Field(gt=0)] = 0.1
    pairs: PosInt = 2000              # correct vs incorrect arithmetic answers (training split only)


# where posttrain / quantize / evaluate run (pipeline/device.py): auto = CUDA when present, else CPU;
# precision auto = bf16 autocast on CUDA, fp32 on CPU (the offline default: CPU, fp32, bitwise)
StageDevice = Literal["auto", "cpu", "cuda"]
StagePrecision = Literal["auto", "fp32", "bf16"]


class PosttrainCfg(Strict):
    sft: list[SFTSourceCfg] = [SFTSourceCfg(kind="builtin", builtin="arithmetic-qa", max_examples=4000),
                               SFTSourceCfg(kind="builtin", builtin="python-docs-qa", max_examples=1000)]
    steps: PosInt = 300
    batch_size: PosInt = 16
    lr: Annotated[Float, Field(gt=0)] = 3e-4
    warmup_steps: NonNegInt = 20
    weight_decay: Annotated[Float, Field(ge=0)] = 0.0
    max_len_tokens: PosInt = 192      # longer conversations are cut (the loss mask is cut with them)
    answer_max_chars: PosInt = 400    # python-docs-qa: first paragraph cut to this many characters
    # windows of max_len_tokens pretraining tokens (rows of the published order: what pretraining read,
    # decontaminated) mixed into SFT with the loss on every token: replay, against forgetting
    replay_examples: NonNegInt = 0
    dpo: DPOCfg = DPOCfg()
    eval_problems: PosInt = 200       # held-out arithmetic problems for arith_em_before / _after
    seed: StrictInt | None = None           # defaults to the recipe seed
    device: StageDevice = "auto"
    precision: StagePrecision = "auto"
    ladder: StrictBool = True         # publish the first and last step as rungs (after pretraining's)


# --- quantization (pipeline/quantize/)


class QuantizeCfg(Strict):
    group_size: PosInt = 32           # int4: one scale per this many input columns
    methods: list[Literal["int8-rtn", "int4-rtn", "int4-gptq"]] = ["int8-rtn", "int4-rtn", "int4-gptq"]
    calib_windows: PosInt = 32        # GPTQ calibration windows of seq_len tokens (held-out split)
    eval_windows: PosInt = 64         # perplexity windows of seq_len tokens (held-out split, disjoint)
    seq_len: PosInt | None = None     # defaults to blend.seq_len
    gptq_damp: Annotated[Float, Field(gt=0, lt=1)] = 0.01
    gguf: list[Literal["F16", "Q8_0", "Q4_0"]] = ["F16", "Q8_0", "Q4_0"]
    device: StageDevice = "auto"      # calibration and perplexity forwards; quantized files are the same format
    precision: StagePrecision = "auto"


# --- evaluation (pipeline/evaluate/)


class EvalLadderCfg(Strict):
    """Learning curves: every rung of the checkpoint ladder scored on a few tasks (empty: off)."""
    tasks: list[str] = ["omp_ppl_python_docs", "omp_ppl_python_code", "omp_ppl_arithmetic", "omp_arith_mc"]
    limit: PosInt | None = 5          # items per task and rung (None: all); tiny: 13 rungs in < 60 s


class EvaluateCfg(Strict):
    """lm-eval on every model variant of the chain; tasks are lm-eval task or tag names."""
    tasks: list[str] = ["omp_ppl_python_docs", "omp_ppl_python_code", "omp_ppl_arithmetic", "omp_arith_mc",
                        "omp_code_mc", "omp_arith_gen"]   # our local tasks (evals/tasks/), offline
    chat_tasks: list[str] = ["omp_arith_gen_chat"]        # with the chat template, post-trained variants only
    standard_tasks: list[str] = []    # e.g. [hellaswag, arc_easy, leaderboard]: need the hub; skipped offline
    include_path: str = "evals/tasks"
    limit: PosInt | None = None       # items per task (None: all)
    batch_size: PosInt = 16
    variants: list[str] | None = None  # evaluate only these variant names (None: all found)
    gguf_base_url: str | None = None  # a llama.cpp server for lm-eval's gguf model (serves one GGUF)
    # a Python with llama-cpp-python[server]: evaluate serves each GGUF variant with it in turn and
    # runs lm-eval's gguf model on the tasks it supports (None or absent: GGUF variants are skipped)
    gguf_server_python: str | None = None
    contamination_ngram: PosInt = 13  # n-gram length (tokens) for the overlap check against training
    bootstrap_rounds: PosInt = 200    # Bradley-Terry 95% intervals
    device: StageDevice = "auto"      # lm-eval's HFLM device for the HF variants
    precision: StagePrecision = "auto"
    ladder: EvalLadderCfg = EvalLadderCfg()


# --- pretraining (pipeline/pretrain/, pipeline/model.py)


class ModelCfg(Strict):
    """A Llama-architecture decoder (transformers LlamaForCausalLM); vocab size comes from the tokenizer."""
    layers: PosInt = 4
    hidden_size: PosInt = 256
    heads: PosInt = 4
    kv_heads: PosInt = 2
    intermediate_size: PosInt = 688
    rope_theta: Annotated[Float, Field(gt=0)] = 10000.0
    tie_embeddings: StrictBool = True
    context_length: PosInt | None = None   # max positions; defaults to blend.seq_len

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} is not divisible by kv_heads {self.kv_heads}")
        return self


class LadderCfg(Strict):
    """The steps whose weights are published (pipeline/ladder.py), in the style of the open suites
    (Pythia: step 0, powers of two, then every K steps): `initial` step 0, `powers_of_two` 1, 2, 4, ...
    below K, every `every` (K) steps, the listed `steps`, and always the last step. Written as HF-format folders
    `artifacts/pretrain/ladder/step-NNNNNNN/`, apart from the resume checkpoints `keep_last` prunes."""
    enabled: StrictBool = True
    initial: StrictBool = True              # step 0: the seed's initialization
    powers_of_two: StrictBool = True        # 1, 2, 4, ... below the last step
    every: PosInt | None = 1000             # every K steps (None: none)
    steps: list[NonNegInt] = []             # extra steps


class PretrainCfg(Strict):
    model: ModelCfg = ModelCfg()
    lr: Annotated[Float, Field(gt=0)] = 3e-3
    min_lr_ratio: Annotated[Float, Field(ge=0, le=1)] = 0.1   # cosine decays to lr * this
    warmup_steps: NonNegInt = 20
    schedule: Literal["cosine", "wsd"] = "cosine"            # wsd: flat, then linear decay over decay_fraction
    decay_fraction: Annotated[Float, Field(gt=0, le=1)] = 0.2
    weight_decay: Annotated[Float, Field(ge=0)] = 0.1
    betas: tuple[Beta, Beta] = (0.9, 0.95)   # each in [0, 1)
    eps: Annotated[Float, Field(gt=0)] = 1e-8
    grad_clip: Annotated[Float, Field(gt=0)] | None = 1.0
    grad_accum_steps: PosInt = 1           # micro-batches per worker per step
    steps: PosInt | None = None            # train this many steps of the published order (None: all)
    checkpoint_every_steps: PosInt = 50
    keep_last: PosInt = 3
    eval_every_steps: PosInt = 50
    eval_tokens: PosInt = 16384            # held-out tokens per source per evaluation
    log_every_steps: PosInt = 10
    compile: StrictBool = False                  # torch.compile the model
    precision: Literal["auto", "fp32", "bf16"] = "auto"   # auto: bf16 autocast on GPU, fp32 on CPU
    threads: PosInt | None = None          # torch threads per worker (None: platform.threads // world_size,
                                           # or cores // world_size under platform.numerics native)
    distributed: DistributedCfg = DistributedCfg()
    ladder: LadderCfg = LadderCfg()


# --- release (pipeline/release.py)


class ReleaseCfg(Strict):
    name: SafeName | None = None           # release folder artifacts/release/<name>/ (default: recipe name)
    variant: Literal["posttrain", "pretrain"] = "posttrain"   # the model at the top of the release
    include_base: StrictBool = True         # also ship the pretrained weights under base/ (for recreate --until pretrain)
    include_quantized: StrictBool = True    # quantized variants under quantized/<name>/
    include_gguf: StrictBool = True         # GGUF files under gguf/
    include_ladder: StrictBool = True       # the checkpoint ladder under checkpoints/step-NNNNNNN/
    license: str = "apache-2.0"
    repo_id: str | None = None        # default hub repo for `omp publish`
    base_model: str | None = None     # hub id of the published base model (model card `base_model`)
    language: list[str] = ["en"]      # model card `language` (ISO 639-1 codes of the training text)
    tags: list[str] = []


# --- where the numerics come from (pipeline/numerics.py)


class PlatformCfg(Strict):
    """CPU numerics of every process the chain starts (pipeline/numerics.py). portable (default):
    ATen at AVX2, MKL's CNR AVX2 branch, oneDNN at most AVX2, `threads` threads: the same bits on
    any Intel CPU with AVX2 (and on any AMD CPU with AVX2, against other AMD CPUs: MKL runs its AUTO
    branch there). compatible: MKL's COMPATIBLE branch too, the same bits across vendors (~2.4x
    slower GEMMs). native: nothing pinned, the CPU's fastest paths, bitwise only on the same CPU."""
    numerics: Literal["portable", "compatible", "native"] = "portable"
    threads: PosInt = 2               # intra-op threads per process (portable, compatible); split over
                                      # torchrun workers unless pretrain.threads is set


# --- sections added by later stages go above this line; their fields go in Recipe below


class Recipe(Strict):
    name: SafeName                    # names folders (artifacts/release/<name>/): [A-Za-z0-9._-]
    seed: StrictInt = 1234
    data: DataCfg = DataCfg()
    tokenizer: TokenizerCfg = TokenizerCfg()
    tokenize: TokenizeCfg = TokenizeCfg()
    blend: BlendCfg = BlendCfg()
    pretrain: PretrainCfg = PretrainCfg()
    posttrain: PosttrainCfg = PosttrainCfg()
    quantize: QuantizeCfg = QuantizeCfg()
    evaluate: EvaluateCfg = EvaluateCfg()
    release: ReleaseCfg = ReleaseCfg()
    platform: PlatformCfg = PlatformCfg()
    # folders outside the project this recipe may read (posttrain local files, tokenizer.pretrained_dir,
    # ...); empty: every local path must lie inside the project
    allow_paths: list[str] = []

    @property
    def blend_seed(self) -> int:
        return self.seed if self.blend.seed is None else self.blend.seed


# --------------------------------------------------------------------------- loading


_TAGS = ("builtin", "hf", "local", "language", "quality")  # discriminator values of sources and steps


def _format_errors(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        # drop discriminator tags pydantic inserts (e.g. 'builtin') so the path reads like the YAML
        loc = [str(x) for x in e["loc"] if x not in _TAGS or x == e["loc"][-1]]
        key = ".".join(loc) if loc else "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{key}: {msg}")
    return "; ".join(parts)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a mapping with the same key twice (PyYAML keeps the last silently)."""


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _value in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {seen[key]} and line {key_node.start_mark.line + 1})",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def safe_load_unique(text: str):
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(path, "", "file not found")
    try:
        data = safe_load_unique(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RecipeError(path, "", f"not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        msg = " ".join(str(e).split())
        raise RecipeError(path, "", f"not valid YAML: {msg}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(path, "", "top level must be a mapping")
    return data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _resolve_base(path: Path, seen: tuple = ()) -> dict:
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise RecipeError(path, "base", "must be a path to another recipe")
    base_path = (path.parent / base).resolve()
    if base_path in seen:
        raise RecipeError(path, "base", "recipes include each other in a cycle")
    if not base_path.is_file():
        raise RecipeError(path, "base", f"base recipe {base} not found")
    return _merge(_resolve_base(base_path, seen + (path.resolve(),)), data)


def load_recipe(path: str | os.PathLike, overrides: dict | None = None, check_files: StrictBool = True) -> Recipe:
    path = Path(path)
    data = _resolve_base(path)
    if overrides:
        data = _merge(data, overrides)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(path, "", _format_errors(e)) from None
    object.__setattr__(recipe, "_path", str(path))
    if check_files:
        from pipeline.verify import confine

        for key, value in (("data.manifest", recipe.data.manifest),
                           ("tokenizer.pretrained_dir", recipe.tokenizer.pretrained_dir),
                           ("tokenize.decontaminate_tasks", recipe.tokenize.decontaminate_tasks),
                           ("evaluate.include_path", recipe.evaluate.include_path)):
            if value is not None:
                confine(value, f"{path}: {key}", recipe.allow_paths)
        if not Path(recipe.data.manifest).is_file():
            raise RecipeError(path, "data.manifest", f"manifest file {recipe.data.manifest} does not exist")
        load_manifest(recipe.data.manifest)
        if recipe.tokenizer.pretrained_dir and not Path(recipe.tokenizer.pretrained_dir, "tokenizer.json").is_file():
            raise RecipeError(path, "tokenizer.pretrained_dir",
                              f"{recipe.tokenizer.pretrained_dir} has no tokenizer.json")
    return recipe


def load_manifest(path: str | os.PathLike) -> Manifest:
    path = Path(path)
    data = _read_yaml(path)
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        raise RecipeError(path, "", _format_errors(e)) from None


def recipe_dict(recipe: Recipe) -> dict[str, Any]:
    return recipe.model_dump(mode="json")


# Keys that choose where the data stages run, never what they write (tests/test_data_executor.py):
# left out of recipe_sha256, so a run on Ray has the recipe hash of the same run in one process.
# Likewise where and how training processes are launched (machines, rendezvous, Lighthouse address,
# torchft timeouts): the same recipe run on one host or two has one hash.
EXECUTION_ONLY = {"data": ("executor", "workers", "ray_address", "unit_docs"),
                  "pretrain.distributed": ("nodes", "torchft")}


def recipe_sha256(recipe: Recipe) -> str:
    """Hash of the resolved recipe (defaults filled in, bases merged), independent of YAML layout
    and of the EXECUTION_ONLY keys."""
    full = recipe_dict(recipe)
    for section, keys in EXECUTION_ONLY.items():
        node = full
        for part in section.split("."):
            node = node[part]
        for key in keys:
            node.pop(key, None)
    return sha256_bytes(canonical_json(full).encode())


def recipe_subset(recipe: Recipe, keys: list[str], execution: bool = True) -> dict[str, Any]:
    """The resolved values of `keys` (top-level sections or dotted paths such as `data.manifest`),
    nested as in the recipe; without the EXECUTION_ONLY keys when `execution` is false."""
    full, out = recipe_dict(recipe), {}
    for key in keys:
        *parents, leaf = key.split(".")
        src, dst = full, out
        for p in parents:
            src, dst = src[p], dst.setdefault(p, {})
        dst[leaf] = src[leaf]
    if not execution:
        for section, drop in EXECUTION_ONLY.items():  # a section may be a dotted path
            node = out
            for part in section.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict):
                for k in drop:
                    node.pop(k, None)
    return out


def config_sha256(recipe: Recipe, keys: list[str]) -> str:
    """Hash of only the recipe keys a stage reads (`recipe_subset`, EXECUTION_ONLY left out): an edit
    of another stage's section leaves it, and so that stage's output bytes, as they were."""
    return sha256_bytes(canonical_json(recipe_subset(recipe, keys, execution=False)).encode())


def recipe_path(recipe: Recipe) -> str:
    return getattr(recipe, "_path", "<recipe>")
