"""`MPOConfig`: every knob of the trainer, with the paper's values as defaults, loadable from YAML.

A config is a flat mapping, like TRL's `DPOConfig`: `mmpr train data_cards/train_mpo.yaml
--set learning_rate=1e-5` overrides one key. Unknown keys and bad values are refused with a message
that names the file, the key and the reason.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpr_pipeline.recipe import RecipeError, read_yaml  # read_yaml: bounded size and alias expansion
from mmpr_pipeline.train.loss import PREFERENCE_LOSSES


class ConfigError(RecipeError):
    """A training config that cannot be used; the message names file, key and reason."""


@dataclass
class MPOConfig:
    # What to train, on what, and where to write it.
    model: str = "build/models/demo"            # Hub id or local folder (AutoModelForImageTextToText)
    data: str = "runs/demo/data"                # a run folder, its data/ folder, Parquet files (glob), or a Hub dataset id
    eval_data: str | None = None                # held-out pairs; None: hold out `eval_fraction` of `data`, by question
    output_dir: str = "runs/demo/mpo"
    pair_types: list[str] | None = None         # keep only these pair types (None: all)
    limit: int | None = None                    # use the first N training pairs (quick runs)

    # The loss (MPO paper, Sec. 4.1): w_p * preference + w_q * BCO + w_g * SFT.
    beta: float = 0.1
    weights: list[float] = field(default_factory=lambda: [0.8, 0.2, 1.0])
    preference_loss: str = "sigmoid"            # sigmoid (DPO) | ipo | hinge
    bco_shift: str = "running_mean"             # running_mean (the paper's delta) | none (delta = 0)

    # The model and its reference.
    dtype: str = "float32"                      # weights: float32 (with bf16 autocast) | bfloat16 | float16
    bf16: str | bool = "auto"                   # autocast to bf16: auto (on a GPU that supports it) | true | false
    attn_implementation: str | None = "sdpa"
    reference: str = "live"                     # live: frozen copy (or adapters off under LoRA) | precomputed
    freeze_vision: bool = True                  # train the language model (and projector), not the vision encoder
    gradient_checkpointing: bool = False
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | str = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    max_pixels: int | None = None               # cap the processor's image size (None: the processor's own)

    # Data.
    max_length: int = 4096                      # prompt + response tokens; longer pairs are dropped, never cut
    batch_size: int = 4                         # pairs per device per micro-batch
    eval_batch_size: int = 8
    eval_fraction: float = 0.02
    num_workers: int = 0

    # Optimisation.
    learning_rate: float = 5e-6
    weight_decay: float = 0.05
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0                   # the cosine decays to learning_rate * min_lr_ratio
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    max_steps: int = -1                         # > 0 overrides epochs
    seed: int = 42

    # Logging, evaluation, checkpoints.
    log_every: int = 1
    eval_every: int = 0                         # steps; 0: only at the end
    save_every: int = 0                         # steps; 0: only at the end; -1: never (benchmarks)
    save_total_limit: int = 2
    resume: bool = True                         # continue from the latest checkpoint in output_dir
    resume_with_changes: bool = False           # resume even if that checkpoint was saved with another config
    save_model: bool = True                     # write the trained model (merged under LoRA) to output_dir/final
    progress_bar: bool = True

    file: str = field(default="<config>", repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("file")
        return d

    @property
    def needs_reference(self) -> bool:
        """False for SFT only (w_p = w_q = 0): then neither the reference nor the rejected responses are needed."""
        return bool(self.weights[0] or self.weights[1])


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(MPOConfig) if f.name != "file"}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_KINDS = {  # a declared field type -> (accepts the value?, conversion)
    "None": (lambda v: v is None, None),
    "bool": (lambda v: isinstance(v, bool), None),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), None),
    "float": (_is_number, float),
    "str": (lambda v: isinstance(v, str), None),
    "list[str]": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), None),
    "list[float]": (lambda v: isinstance(v, list) and all(map(_is_number, v)), lambda v: [float(x) for x in v]),
}


def _check_type(name: str, value: Any, file: str) -> Any:
    """`value` if it has one of the field's declared types (e.g. "float", "list[str] | None"; an
    integer is a fine float), else a ConfigError."""
    declared = _fields()[name].type
    for kind in declared.split(" | "):
        accepts, convert = _KINDS[kind]
        if accepts(value):
            return convert(value) if convert else value
    raise ConfigError(file, name, f"expected {declared.replace('None', 'null')}, got {value!r}")


def validate(cfg: MPOConfig) -> MPOConfig:
    f = cfg.file

    def check(cond: bool, key: str, reason: str) -> None:
        if not cond:
            raise ConfigError(f, key, reason)

    # inf and nan pass most range checks below (inf > 0), and train a model of NaNs: refuse them first.
    for name, value in cfg.to_dict().items():
        numbers = value if isinstance(value, list) else [value]
        bad = [x for x in numbers if isinstance(x, float) and not math.isfinite(x)]
        check(not bad, name, f"must be a finite number, got {value}")
    check(len(cfg.weights) == 3 and all(w >= 0 for w in cfg.weights), "weights",
          f"expected three non-negative numbers (w_p, w_q, w_g), got {cfg.weights}")
    check(any(cfg.weights), "weights", "at least one weight must be positive")
    check(cfg.beta > 0, "beta", f"must be > 0, got {cfg.beta}")
    check(cfg.preference_loss in PREFERENCE_LOSSES, "preference_loss",
          f"unknown {cfg.preference_loss!r} (expected one of: {', '.join(PREFERENCE_LOSSES)})")
    check(cfg.bco_shift in ("running_mean", "none"), "bco_shift",
          f"expected running_mean or none, got {cfg.bco_shift!r}")
    check(cfg.reference in ("live", "precomputed"), "reference",
          f"expected live or precomputed, got {cfg.reference!r}")
    check(cfg.dtype in ("float32", "bfloat16", "float16"), "dtype",
          f"expected float32, bfloat16 or float16, got {cfg.dtype!r}")
    check(cfg.bf16 in ("auto", True, False), "bf16", f"expected auto, true or false, got {cfg.bf16!r}")
    for k in ("max_length", "batch_size", "eval_batch_size", "grad_accum_steps", "log_every", "lora_r",
              "save_total_limit"):
        check(getattr(cfg, k) >= 1, k, f"must be >= 1, got {getattr(cfg, k)}")
    for k in ("eval_every", "num_workers"):
        check(getattr(cfg, k) >= 0, k, f"must be >= 0, got {getattr(cfg, k)}")
    check(cfg.save_every >= -1, "save_every", f"must be >= -1, got {cfg.save_every}")
    check(cfg.learning_rate > 0, "learning_rate", f"must be > 0, got {cfg.learning_rate}")
    check(0 <= cfg.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {cfg.warmup_ratio}")
    check(0 <= cfg.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {cfg.min_lr_ratio}")
    check(0 <= cfg.eval_fraction < 1, "eval_fraction", f"must be in [0, 1), got {cfg.eval_fraction}")
    check(cfg.epochs > 0 or cfg.max_steps > 0, "epochs", "set epochs > 0 or max_steps > 0")
    check(len(cfg.adam_betas) == 2 and all(0 <= b < 1 for b in cfg.adam_betas), "adam_betas",
          f"expected two numbers in [0, 1), got {cfg.adam_betas}")
    check(cfg.limit is None or cfg.limit >= 1, "limit", f"must be >= 1, got {cfg.limit}")
    check(isinstance(cfg.lora_target_modules, (str, list)), "lora_target_modules",
          "expected a list of module names or a string (e.g. all-linear)")
    if cfg.pair_types is not None:
        from mmpr_pipeline.records import PAIR_TYPES
        bad = [t for t in cfg.pair_types if t not in PAIR_TYPES]
        check(not bad, "pair_types", f"unknown pair types {bad} (expected some of: {', '.join(PAIR_TYPES)})")
    return cfg


def from_dict(data: Any, file: str = "<config>") -> MPOConfig:
    if not isinstance(data, dict):
        raise ConfigError(file, "(top level)", "a training config is a YAML mapping")
    known = _fields()
    kwargs = {}
    for k, v in data.items():
        if k not in known:
            raise ConfigError(file, k, f"unknown key (expected one of: {', '.join(sorted(known))})")
        kwargs[k] = _check_type(k, v, file)
    return validate(MPOConfig(**kwargs, file=str(file)))


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> MPOConfig:
    """Load and validate a YAML config; `overrides` replace keys (e.g. from `--set key=value`)."""
    path = Path(path)
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(path, "(top level)", "a training config is a YAML mapping")
    data.update(overrides or {})
    return from_dict(data, str(path))


def to_json(cfg: MPOConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
