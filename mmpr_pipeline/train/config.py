"""`MPOConfig`: every knob of the trainer, with the paper's values as defaults, loadable from YAML.

A config is a flat mapping, like TRL's `DPOConfig`: `mmpr train data_cards/train_mpo.yaml
--set learning_rate=1e-5` overrides one key; `mmpr train --list-options` prints every key with its help.
It is read by the one config mechanism (`mmpr_pipeline/config.py`): unknown keys and bad values are
refused with a ConfigError that names the file, the key and the reason.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmpr_pipeline import config
from mmpr_pipeline.config import ConfigError, build, option, read_yaml
from mmpr_pipeline.train.loss import PREFERENCE_LOSSES

__all__ = ["ConfigError", "MPOConfig", "from_dict", "load", "to_json"]


@dataclass
class MPOConfig:
    # What to train, on what, and where to write it.
    model: str = option(
        "build/models/demo",
        help="the model to train: a Hub id or a local folder (loaded with AutoModelForImageTextToText)",
    )
    data: str = option(
        "runs/demo/data",
        help="training pairs: a run folder, its data/ folder, Parquet files (a glob), or a Hub dataset id",
    )
    eval_data: str | None = option(
        None, help="held-out pairs; null: hold out `eval_fraction` of `data`, by question"
    )
    output_dir: str = option("runs/demo/mpo", help="where checkpoints, metrics and the final model go")
    pair_types: list[str] | None = option(None, help="keep only these pair types (null: all)")
    limit: int | None = option(None, help="use the first N training pairs (quick runs)")

    # The loss (MPO paper, Sec. 4.1): w_p * preference + w_q * BCO + w_g * SFT.
    beta: float = option(0.1, help="the KL penalty beta of the preference and BCO losses")
    weights: list[float] = option(
        default_factory=lambda: [0.8, 0.2, 1.0],
        help="[w_p, w_q, w_g]: weights of the preference, BCO and SFT losses",
    )
    preference_loss: str = option("sigmoid", help="sigmoid (DPO) | ipo | hinge")
    bco_shift: str = option(
        "running_mean", help="the BCO reward shift delta: running_mean (the paper's) | none (delta = 0)"
    )

    # The model and its reference.
    dtype: str = option("float32", help="weights: float32 (with bf16 autocast) | bfloat16 | float16")
    bf16: str | bool = option(
        "auto", help="autocast to bf16: auto (on a GPU that supports it) | true | false"
    )
    attn_implementation: str | None = option(
        "sdpa", help="passed to from_pretrained (null: the model's default)"
    )
    reference: str = option(
        "live",
        help="live: a frozen copy (or the adapters off under LoRA) | precomputed: "
        "reference log-probs computed once before training",
    )
    freeze_vision: bool = option(
        True, help="train the language model (and projector), not the vision encoder"
    )
    gradient_checkpointing: bool = option(
        False, help="recompute activations in the backward pass (less memory)"
    )
    lora: bool = option(False, help="train LoRA adapters instead of the full model")
    lora_r: int = option(16, help="LoRA rank")
    lora_alpha: int = option(32, help="LoRA alpha (the adapters' scale is alpha / r)")
    lora_dropout: float = option(0.05, help="dropout on the LoRA adapters' input")
    lora_target_modules: list[str] | str = option(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        help="module names to adapt, or a PEFT keyword such as all-linear",
    )
    max_pixels: int | None = option(None, help="cap the processor's image size (null: the processor's own)")
    strategy: str = option(
        "ddp",
        help="ddp: every process holds the whole model (data-parallel) | fsdp: weights, gradients and "
        "AdamW states sharded over the processes (PyTorch FSDP2), for models one device cannot hold",
    )
    cpu_offload: bool = option(
        False, help="fsdp on GPUs: keep the sharded parameters and optimizer states in host memory"
    )
    trust_remote_code: bool = option(
        False,
        help="let the model folder run its own Python code (its config's auto_map); without it such a "
        "folder is refused",
    )

    # Data.
    max_length: int = option(4096, help="prompt + response tokens; longer pairs are dropped, never cut")
    batch_size: int = option(4, help="pairs per device per micro-batch")
    eval_batch_size: int = option(8, help="pairs per evaluation batch")
    eval_fraction: float = option(
        0.02, help="share of questions held out for evaluation when eval_data is null"
    )
    num_workers: int = option(0, help="DataLoader worker processes (0: load in the training process)")

    # Optimisation.
    learning_rate: float = option(5e-6, help="peak learning rate (AdamW)")
    weight_decay: float = option(0.05, help="AdamW weight decay")
    adam_betas: list[float] = option(default_factory=lambda: [0.9, 0.999], help="AdamW [beta1, beta2]")
    warmup_ratio: float = option(0.05, help="share of the steps with a linear warm-up")
    min_lr_ratio: float = option(0.0, help="the cosine decays to learning_rate * min_lr_ratio")
    grad_accum_steps: int = option(1, help="micro-batches per optimiser step")
    max_grad_norm: float = option(1.0, help="clip the gradient norm to this")
    epochs: float = option(1.0, help="passes over the training pairs (a fraction is fine)")
    max_steps: int = option(-1, help="optimiser steps; > 0 overrides epochs")
    seed: int = option(42, help="seed for the data order, the held-out split and initialisation")

    # Logging, evaluation, checkpoints.
    log_every: int = option(1, help="write metrics every N steps")
    eval_every: int = option(0, help="evaluate every N steps; 0: only at the end")
    save_every: int = option(0, help="checkpoint every N steps; 0: only at the end; -1: never (benchmarks)")
    save_total_limit: int = option(2, help="keep at most this many checkpoints")
    resume: bool = option(True, help="continue from the latest checkpoint in output_dir")
    resume_with_changes: bool = option(
        False, help="resume even if that checkpoint was saved with another config"
    )
    save_model: bool = option(True, help="write the trained model (merged under LoRA) to output_dir/final")
    progress_bar: bool = option(True, help="show a progress bar")

    file: str = option(
        "<config>",
        help="where the config was loaded from (set by the loader)",
        settable=False,
        repr=False,
        compare=False,
    )

    def __post_init__(self) -> None:
        # In this order: the first failing check is the one reported.
        self._check_finite()
        self._check_loss()
        self._check_model_and_strategy()
        self._check_ranges()
        self._check_data_selection()

    def _check(self, cond: bool, key: str, reason: str) -> None:
        config.check(cond, key, reason, self.file)

    def _check_finite(self) -> None:
        # inf and nan pass most range checks below (inf > 0), and train a model of NaNs: refuse them first.
        for name, value in self.to_dict().items():
            numbers = value if isinstance(value, list) else [value]
            bad = [x for x in numbers if isinstance(x, float) and not math.isfinite(x)]
            self._check(not bad, name, f"must be a finite number, got {value}")

    def _check_loss(self) -> None:
        check = self._check
        check(
            len(self.weights) == 3 and all(w >= 0 for w in self.weights),
            "weights",
            f"expected three non-negative numbers (w_p, w_q, w_g), got {self.weights}",
        )
        check(any(self.weights), "weights", "at least one weight must be positive")
        check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        check(
            self.preference_loss in PREFERENCE_LOSSES,
            "preference_loss",
            f"unknown {self.preference_loss!r} (expected one of: {', '.join(PREFERENCE_LOSSES)})",
        )
        check(
            self.bco_shift in ("running_mean", "none"),
            "bco_shift",
            f"expected running_mean or none, got {self.bco_shift!r}",
        )

    def _check_model_and_strategy(self) -> None:
        check = self._check
        check(
            self.reference in ("live", "precomputed"),
            "reference",
            f"expected live or precomputed, got {self.reference!r}",
        )
        check(
            self.dtype in ("float32", "bfloat16", "float16"),
            "dtype",
            f"expected float32, bfloat16 or float16, got {self.dtype!r}",
        )
        check(self.bf16 in ("auto", True, False), "bf16", f"expected auto, true or false, got {self.bf16!r}")
        check(self.strategy in ("ddp", "fsdp"), "strategy", f"expected ddp or fsdp, got {self.strategy!r}")
        check(not self.cpu_offload or self.strategy == "fsdp", "cpu_offload", "needs strategy: fsdp")

    def _check_ranges(self) -> None:
        check = self._check
        for k in (
            "max_length",
            "batch_size",
            "eval_batch_size",
            "grad_accum_steps",
            "log_every",
            "lora_r",
            "save_total_limit",
        ):
            check(getattr(self, k) >= 1, k, f"must be >= 1, got {getattr(self, k)}")
        for k in ("eval_every", "num_workers"):
            check(getattr(self, k) >= 0, k, f"must be >= 0, got {getattr(self, k)}")
        check(self.save_every >= -1, "save_every", f"must be >= -1, got {self.save_every}")
        check(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check(0 <= self.eval_fraction < 1, "eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        check(self.epochs > 0 or self.max_steps > 0, "epochs", "set epochs > 0 or max_steps > 0")
        check(
            len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
            "adam_betas",
            f"expected two numbers in [0, 1), got {self.adam_betas}",
        )

    def _check_data_selection(self) -> None:
        check = self._check
        check(self.limit is None or self.limit >= 1, "limit", f"must be >= 1, got {self.limit}")
        check(
            isinstance(self.lora_target_modules, (str, list)),
            "lora_target_modules",
            "expected a list of module names or a string (e.g. all-linear)",
        )
        if self.pair_types is not None:
            from mmpr_pipeline.records import PAIR_TYPES

            bad = [t for t in self.pair_types if t not in PAIR_TYPES]
            check(
                not bad, "pair_types", f"unknown pair types {bad} (expected some of: {', '.join(PAIR_TYPES)})"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("file")
        return d

    @property
    def needs_reference(self) -> bool:
        """False for SFT only (w_p = w_q = 0): then neither the reference nor the rejected responses
        are needed."""
        return bool(self.weights[0] or self.weights[1])


def from_dict(data: Any, file: str = "<config>") -> MPOConfig:
    if not isinstance(data, dict):
        raise ConfigError(file, "(top level)", "a training config is a YAML mapping")
    return build(MPOConfig, data, file, fixed={"file": str(file)})


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
