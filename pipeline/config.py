"""Typed recipes and data manifests, checked at the door.

A recipe (`recipes/<name>.yaml`) holds every parameter of one experiment chain. It is validated
on load: an unknown key, a wrong type or an impossible value raises RecipeError naming the file
and the key path (e.g. `recipes/tiny.yaml: blend.seq_len: must be > 0`), before any work starts.

A recipe may start from another with `base: other.yaml` (path relative to the recipe): the base
is loaded first and the recipe's keys are merged over it, section by section.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import RecipeError
from pipeline.io import canonical_json, sha256_bytes


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]

# --------------------------------------------------------------------------- data manifest


class Filters(Strict):
    min_chars: NonNegInt = 1
    max_chars: PosInt | None = None
    dedup: bool = True  # drop exact duplicate documents (first one kept)


class SourceBase(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    license: Annotated[str, Field(min_length=1)]
    weight: Annotated[float, Field(gt=0)]
    filters: Filters = Filters()
    max_docs: PosInt | None = None
    max_bytes: PosInt | None = None
    seed: int = 0  # order in which documents are taken before max_docs / max_bytes apply


class ArithmeticOptions(Strict):
    docs: PosInt = 2000
    problems_per_doc: PosInt = 8
    max_operand: PosInt = 99
    ops: list[Literal["+", "-", "*"]] = ["+", "-", "*"]
    heldout_per_mille: Annotated[int, Field(ge=1, le=500)] = 100

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
    lock: bool = True  # verify ingested content against data_manifests/<mix>.lock.json


class TokenizerCfg(Strict):
    vocab_size: Annotated[int, Field(ge=300, le=1_000_000)] = 4096
    min_frequency: PosInt = 2
    sample_bytes: PosInt = 2_000_000  # bytes of text drawn from the mixture to train BPE
    pretrained_dir: str | None = None  # use this tokenizer directory instead of training one


class TokenizeCfg(Strict):
    val_per_mille: Annotated[int, Field(ge=1, le=500)] = 20  # documents held out per source
    batch_docs: PosInt = 512


class BlendCfg(Strict):
    seq_len: PosInt = 256
    global_batch_size: PosInt = 16
    tokens: PosInt = 1_000_000  # training token budget; steps = tokens // (batch * seq_len)
    seed: int | None = None  # defaults to the recipe seed


# --- low-communication training (pretrain.distributed): shared by the trainer and pipeline/lowcomm


class OuterCompressionCfg(Strict):
    kind: Literal["none", "fp16", "int8", "int4"] = "none"
    block_size: PosInt = 64          # elements per quantization block (one scale each)
    topk_fraction: Annotated[float, Field(gt=0, le=1)] | None = None  # keep this fraction of entries
    error_feedback: bool = True      # add the residual to the next pseudo-gradient


class DiLoCoCfg(Strict):
    inner_steps: PosInt = 50         # H: inner AdamW steps between outer syncs
    outer_lr: Annotated[float, Field(gt=0)] = 0.7          # Douillard et al. 2023 defaults
    outer_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    nesterov: bool = True
    warmup_sync_steps: NonNegInt = 0  # synchronous (ddp) steps before the first inner phase
    fragments: PosInt = 1            # streaming DiLoCo: sync 1/F of the parameters at a time
    compression: OuterCompressionCfg = OuterCompressionCfg()


class DeMoCfg(Strict):
    chunk_size: PosInt = 64          # DCT chunk length (elements)
    topk: PosInt = 8                 # components exchanged per chunk
    momentum_decay: Annotated[float, Field(ge=0, lt=1)] = 0.999
    sign: bool = True                # apply sign of the decoded update (as in the paper)


class DistributedCfg(Strict):
    mode: Literal["ddp", "diloco", "demo"] = "ddp"
    world_size: PosInt = 1           # 1 runs in-process; >1 launches torchrun (or deepspeed)
    engine: Literal["torchrun", "deepspeed"] = "torchrun"
    zero_stage: Annotated[int, Field(ge=0, le=3)] = 2   # with engine: deepspeed
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    diloco: DiLoCoCfg = DiLoCoCfg()
    demo: DeMoCfg = DeMoCfg()


# --- sections added by later stages go above this line; their fields go in Recipe below


class Recipe(Strict):
    name: str
    seed: int = 1234
    data: DataCfg = DataCfg()
    tokenizer: TokenizerCfg = TokenizerCfg()
    tokenize: TokenizeCfg = TokenizeCfg()
    blend: BlendCfg = BlendCfg()

    @property
    def blend_seed(self) -> int:
        return self.seed if self.blend.seed is None else self.blend.seed


# --------------------------------------------------------------------------- loading


def _format_errors(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        # drop discriminator tags pydantic inserts (e.g. 'builtin') so the path reads like the YAML
        loc = [str(x) for x in e["loc"] if x not in ("builtin", "hf", "local") or x == e["loc"][-1]]
        key = ".".join(loc) if loc else "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{key}: {msg}")
    return "; ".join(parts)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(path, "", "file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(path, "", f"not valid YAML: {str(e).splitlines()[0]}") from None
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


def load_recipe(path: str | os.PathLike, overrides: dict | None = None, check_files: bool = True) -> Recipe:
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


def recipe_sha256(recipe: Recipe) -> str:
    """Hash of the resolved recipe (defaults filled in, bases merged), independent of YAML layout."""
    return sha256_bytes(canonical_json(recipe_dict(recipe)).encode())


def recipe_path(recipe: Recipe) -> str:
    return getattr(recipe, "_path", "<recipe>")
