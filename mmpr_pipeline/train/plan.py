"""`mmpr train --plan CONFIG [--nproc N]`: the memory each process needs for the training state under
each strategy, from the model's config alone (the model is built on the meta device: no weights
are read), before a run is started that would not fit.

Per process, in bytes, for P parameters of which T are trained, weights of w bytes each:
    weights P*w, gradients T*w, AdamW's two moments 2*T*w, a live reference (a frozen copy) P*w;
under fsdp each of these is divided by N, plus what FSDP holds whole while a unit runs
("gathered", in the compute dtype c): the parameters outside the units (the root's: the input
embeddings and norms, kept whole from the forward to the end of the backward) and their
gradients, and four of the largest unit (a decoder layer, or the LM head when vocabulary x hidden
is larger; in backward: its parameters, their whole gradients, the flat copy of those that is
reduce-scattered, and the next unit prefetched). On CPU nothing is prefetched (no stream to
overlap it with), so the peak holds about two of it: the plan is high by two units there.
`cpu_offload` moves the sharded part to host memory.

Activations, for a micro-batch of full-length sequences (batch_size x max_length tokens, x2 when
chosen and rejected go through one forward), in the compute dtype: each decoder layer keeps for
its backward about 6*hidden + 2*kv + 4*intermediate values per token (the norms' and projections'
inputs, q/k/v, the MLP's gate, up and product); with gradient checkpointing only each layer's input
(hidden per token) plus one layer's whole set while it is recomputed. Attention scores (SDPA keeps
none), the vision encoder's activations (frozen by default) and the LM head (computed in chunks)
are left out. This is what a run of max_length sequences holds; shorter pairs hold less.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

import torch

from mmpr_pipeline.train.config import MPOConfig
from mmpr_pipeline.train.model import PROJECTOR_NAMES, VISION_PREFIXES

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Counts:
    """Parameter counts by module (`lora` = the adapters' parameters for the config's LoRA settings)."""

    vision: int
    projector: int
    language: int  # the language model with its embeddings and LM head
    largest_block: int  # the largest unit FSDP shards (a block or the LM head)
    lora: int = 0
    root: int = 0  # parameters outside the units (FSDP's root unit: input embeddings, norms)
    # the language model's shapes, for activations (0: not counted, as in the README's table)
    layers: int = 0
    hidden: int = 0
    kv: int = 0  # key/value width (kv heads x head dim)
    intermediate: int = 0

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.language


def _kind(name: str) -> str:
    if any(x in name for x in PROJECTOR_NAMES):
        return "projector"
    if any(f".{v}" in f".{name}" for v in VISION_PREFIXES):
        return "vision"
    return "language"


def count_parameters(model, cfg: MPOConfig) -> Counts:
    """`model` (on any device, the meta device included) counted by module."""
    sizes = {"vision": 0, "projector": 0, "language": 0}
    for name, p in model.named_parameters():
        sizes[_kind(name)] += p.numel()
    unit_sizes = [n for _, n in fsdp_units(model)]
    largest = max(unit_sizes, default=sizes["language"])
    targets = cfg.lora_target_modules
    lora = 0
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or _kind(name) == "projector":
            continue
        if cfg.freeze_vision and _kind(name) == "vision":
            continue
        last = name.rsplit(".", 1)[-1]
        hit = targets == "all-linear" and m is not model.get_output_embeddings()
        if isinstance(targets, list):
            hit = last in targets
        elif isinstance(targets, str) and targets != "all-linear":
            hit = re.fullmatch(targets, name) is not None
        if hit:
            lora += cfg.lora_r * (m.in_features + m.out_features)
    return Counts(
        largest_block=largest,
        lora=lora,
        root=sum(sizes.values()) - sum(unit_sizes),
        **sizes,
        **shapes(model.config),
    )


def fsdp_units(model) -> list[tuple[torch.nn.Module, int]]:
    """The units `fsdp.shard` makes below the root, each with the parameters it shards: the blocks
    (`_no_split_modules`), then the LM head and the vision encoder without its blocks."""
    from mmpr_pipeline.train.fsdp import outer_units

    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    units = [(m, sum(p.numel() for p in m.parameters())) for m in blocks]
    in_blocks = {id(p) for m in blocks for p in m.parameters()}
    for m in outer_units(model):
        units.append((m, sum(p.numel() for p in m.parameters() if id(p) not in in_blocks)))
    return units


def shapes(config) -> dict[str, int]:
    """The decoder's shapes from a model's config (its text config for a VLM)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", 0) or 0
    heads = getattr(text, "num_attention_heads", 0) or 0
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if heads else 0)
    return dict(
        layers=getattr(text, "num_hidden_layers", 0) or 0,
        hidden=hidden,
        kv=(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        intermediate=getattr(text, "intermediate_size", 0) or 0,
    )


def activations(counts: Counts, cfg: MPOConfig, compute: int) -> int:
    """Bytes of activations kept for the backward of one micro-batch of full-length sequences
    (see the module's text for the terms)."""
    tokens = cfg.batch_size * cfg.max_length * (2 if cfg.needs_reference else 1)
    per_layer = 6 * counts.hidden + 2 * counts.kv + 4 * counts.intermediate
    if cfg.gradient_checkpointing:
        kept = counts.layers * counts.hidden + per_layer
    else:
        kept = counts.layers * per_layer
    return tokens * kept * compute


def counts_from_config(cfg: MPOConfig) -> Counts:
    """Parameter counts of `cfg.model`, built from its config on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from mmpr_pipeline.train.model import check_model_name

    check_model_name(cfg.model)
    conf = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(conf, trust_remote_code=cfg.trust_remote_code)
    return count_parameters(model, cfg)


def plan(counts: Counts, cfg: MPOConfig, nproc: int, strategy: str) -> dict[str, float]:
    """Bytes per process: weights, gradients, optimizer, reference, gathered (fsdp), total; and
    `host` (what cpu_offload moves off the device, included in total)."""
    w = BYTES[cfg.dtype]
    compute = 2 if cfg.bf16 in (True, "auto") or cfg.dtype != "float32" else 4  # bf16 autocast on GPUs
    if cfg.lora:
        trained = counts.lora + counts.projector
        weights = counts.total + counts.lora + counts.projector  # the projector's trained copy
    else:
        trained = counts.total - (counts.vision if cfg.freeze_vision else 0)
        weights = counts.total
    live_copy = cfg.needs_reference and cfg.reference == "live" and not cfg.lora
    parts = {
        "weights": weights * w,
        "gradients": trained * w,
        "optimizer": 2 * trained * w,
        "reference": counts.total * w if live_copy else 0,
        "gathered": 0,
    }
    if strategy == "fsdp":
        parts = {k: v / nproc for k, v in parts.items()}
        parts["gathered"] = (2 * counts.root + 4 * counts.largest_block) * compute
    state = sum(v for k, v in parts.items() if k != "gathered")
    parts["activations"] = activations(counts, cfg, compute)
    parts["host"] = state if strategy == "fsdp" and cfg.cpu_offload else 0
    parts["total"] = state + parts["gathered"] + parts["activations"]
    return parts


def table(counts: Counts, cfg: MPOConfig, nproc: int) -> str:
    cols = ("weights", "gradients", "optimizer", "reference", "gathered", "total")
    lines = [
        f"{cfg.model}: {counts.total / 1e9:.3g}B parameters (vision {counts.vision / 1e9:.3g}B, projector "
        f"{counts.projector / 1e9:.3g}B, language {counts.language / 1e9:.3g}B), {nproc} process(es), "
        f"{cfg.dtype} weights, reference {'adapters off' if cfg.lora else cfg.reference}"
        + (", LoRA" if cfg.lora else "")
        + (", vision frozen" if cfg.freeze_vision else ""),
        "GiB per process, before activations:",
        f"{'strategy':<10}" + "".join(f"{c:>11}" for c in cols),
    ]
    for strategy in ("ddp", "fsdp"):
        p = plan(counts, cfg, nproc, strategy)
        lines.append(f"{strategy:<10}" + "".join(f"{p[c] / GIB:>11.2f}" for c in cols))
        if p["host"]:
            lines[-1] += f"   (cpu_offload: {p['host'] / GIB:.2f} of it in host memory)"
    return "\n".join(lines)


def cli_plan(args) -> int:
    """`mmpr train --plan CONFIG [--nproc N] [--set ...]`: print the plan; nothing is loaded or written."""
    from mmpr_pipeline.errors import TrainInputError
    from mmpr_pipeline.recipe import parse_overrides
    from mmpr_pipeline.train import config as config_mod

    try:
        cfg = config_mod.load(args.config, parse_overrides(args.set))
        counts = counts_from_config(cfg)
    except (config_mod.ConfigError, FileNotFoundError, ValueError, OSError) as e:
        raise TrainInputError(str(e)) from e
    print(table(counts, cfg, args.nproc))
    if args.json:
        rows = {s: plan(counts, cfg, args.nproc, s) for s in ("ddp", "fsdp")}
        print(json.dumps({"counts": asdict(counts), "nproc": args.nproc, "bytes": rows}))
    return 0


# InternVL2.5's sizes (the MPO paper's family), approximately, from the model cards: InternViT-300M
# or -6B, an MLP projector, and InternLM2.5 (1.8B, 7B, 20B) or Qwen2.5 (32B, 72B); the largest
# unit is the larger of a decoder layer and the LM head (vocabulary x hidden, untied), the root the
# input embeddings (as large) and the projector (InternVL's `mlp1`, not a name `outer_units` knows).
# For the README's table (`python -m mmpr_pipeline.train.plan`).
PRESETS = {
    "2B": Counts(
        vision=304_000_000,
        projector=12_600_000,
        language=1_890_000_000,
        largest_block=max(63_000_000, 92_553 * 2048),
        root=92_553 * 2048 + 12_600_000,
    ),
    "8B": Counts(
        vision=304_000_000,
        projector=33_600_000,
        language=7_740_000_000,
        largest_block=max(218_000_000, 92_553 * 4096),
        root=92_553 * 4096 + 33_600_000,
    ),
    "26B": Counts(
        vision=5_540_000_000,
        projector=116_000_000,
        language=19_860_000_000,
        largest_block=max(390_000_000, 92_553 * 6144),
        root=92_553 * 6144 + 116_000_000,
    ),
    "38B": Counts(
        vision=5_540_000_000,
        projector=92_000_000,
        language=32_760_000_000,
        largest_block=max(488_000_000, 151_674 * 5120),
        root=151_674 * 5120 + 92_000_000,
    ),
    "78B": Counts(
        vision=5_540_000_000,
        projector=172_000_000,
        language=72_700_000_000,
        largest_block=max(878_000_000, 151_674 * 8192),
        root=151_674 * 8192 + 172_000_000,
    ),
}
VARIANTS = {
    "ddp": ("ddp", {}),
    "fsdp": ("fsdp", {}),
    "fsdp, precomputed ref": ("fsdp", {"reference": "precomputed"}),
    "fsdp, bf16 weights, precomputed ref": ("fsdp", {"reference": "precomputed", "dtype": "bfloat16"}),
    "fsdp + cpu_offload (on the GPU)": ("fsdp", {"cpu_offload": True}),
}


def presets_table(nproc: int = 8, gpu_gib: float = 80, headroom_gib: float = 10) -> str:
    """A Markdown table: GiB per process for each preset and variant (full fine-tuning, vision frozen,
    float32 master weights and bf16 compute unless said), marked as fitting when it leaves
    `headroom_gib` of a `gpu_gib` GPU for activations."""
    lines = ["| model | " + " | ".join(VARIANTS) + " |", "|---" * (len(VARIANTS) + 1) + "|"]
    for name, counts in PRESETS.items():
        cells = []
        for strategy, kw in VARIANTS.values():
            cfg = MPOConfig(strategy=strategy, **kw)
            p = plan(counts, cfg, nproc, strategy)
            device = p["total"] - p["host"]
            mark = "fits" if device / GIB <= gpu_gib - headroom_gib else "no"
            host = f" + {p['host'] / GIB:.0f} host" if p["host"] else ""
            cells.append(f"{device / GIB:.0f}{host} ({mark})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(presets_table())
