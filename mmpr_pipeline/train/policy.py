"""The policy as training holds it: checked and loaded onto its device, with LoRA adapters and
gradient checkpointing if asked, sharded under FSDP (with its reference), its AdamW optimizer, and
at the end saved with LoRA merged, loadable by transformers and vLLM."""

from __future__ import annotations

import contextlib
import copy
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mmpr_pipeline.train import fsdp
from mmpr_pipeline.train.config import MPOConfig
from mmpr_pipeline.train.distributed import Dist
from mmpr_pipeline.train.model import add_lora, freeze_vision, load_model, policy_of, unwrap
from mmpr_pipeline.train.reference import Reference, precompute_reference


def check_model(cfg: MPOConfig) -> None:
    """Before output_dir is made: a Hub id that cannot be found says so in seconds, and a model folder
    that would run its own code is refused unless `trust_remote_code` says so."""
    from mmpr_pipeline import preflight

    if preflight.HUB_ID.match(cfg.model) and not Path(cfg.model).exists() and cfg.model.count("/") == 1:
        preflight.check_model(cfg.model, f"{cfg.file}: model")
    preflight.check_remote_code(
        cfg.model,
        cfg.trust_remote_code,
        f"{cfg.file}: model",
        f"`trust_remote_code: true` in {cfg.file} (or --set trust_remote_code=true)",
    )


def load_policy(model, cfg: MPOConfig, d: Dist):
    """The policy on its device, in float32 (with bf16 autocast) or the dtype asked for, its vision
    encoder frozen if asked; `model` if one is given, else loaded from `cfg.model`."""
    if model is None:
        model = load_model(cfg.model, cfg.dtype, cfg.attn_implementation, cfg.trust_remote_code)
    if not d.sharded:  # fully_shard moves each block's shards to the device itself
        model.to(d.device)
    if cfg.freeze_vision:
        freeze_vision(model)
    return model


def uses_bf16(cfg: MPOConfig, d: Dist) -> bool:
    if cfg.bf16 == "auto":
        return d.device.type == "cuda" and torch.cuda.is_bf16_supported()
    return bool(cfg.bf16)


def with_lora(model, cfg: MPOConfig):
    return add_lora(
        model,
        cfg.lora_r,
        cfg.lora_alpha,
        cfg.lora_dropout,
        cfg.lora_target_modules,
        freeze_vision=cfg.freeze_vision,
    )


def make_trainable(model, cfg: MPOConfig):
    """LoRA adapters and gradient checkpointing, if asked; the model in training mode."""
    if cfg.lora:
        model = with_lora(model, cfg)
    if cfg.gradient_checkpointing:
        unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def make_sharded(
    model,
    ref_model,
    cfg: MPOConfig,
    d: Dist,
    datasets: dict,
    autocast,
    pad_id: int,
    out: Path,
    use_bf16: bool,
    loaded: bool,
) -> tuple[Any, Reference]:
    """strategy: fsdp. LoRA and gradient checkpointing go in first (FSDP shards the modules that are
    there), then the policy and a live reference are sharded alike; a precomputed reference comes
    from the sharded policy with its adapters off (they start at zero: the base model).

    Two whole models never coexist: the policy is sharded (its whole weights freed) before a live
    reference is loaded from `cfg.model` and sharded in turn. Only a policy given as an object
    (`loaded` False) is copied before sharding, having no file to load the reference from."""
    live = cfg.needs_reference and cfg.reference == "live" and not cfg.lora
    frozen = ref_model
    if frozen is None and live and not loaded:
        frozen = copy.deepcopy(model)
    model = make_trainable(model, cfg)
    standin = fsdp.standin_batch(datasets["train"], pad_id, d.device) if d.lockstep else None
    shard = partial(
        fsdp.shard, device=d.device, use_bf16=use_bf16, cpu_offload=cfg.cpu_offload, standin=standin
    )
    root = shard(model)
    fsdp.release_freed()
    if frozen is None and live:
        frozen = load_model(cfg.model, cfg.dtype, cfg.attn_implementation, cfg.trust_remote_code)
    ref = Reference()
    if cfg.needs_reference and frozen is not None:
        ref.model = shard(frozen.eval().requires_grad_(False))
        fsdp.release_freed()
    if cfg.needs_reference and cfg.reference == "precomputed":
        t0, scorer, ref.model = time.perf_counter(), (root if ref.model is None else ref.model), None
        off = policy_of(scorer).disable_adapter() if cfg.lora and scorer is root else contextlib.nullcontext()
        with off:
            for split, name in (("train", "reference_logps.pt"), ("eval", "reference_logps_eval.pt")):
                if len(datasets[split]):
                    ref.tables[split] = precompute_reference(
                        scorer, datasets[split], cfg, d, autocast, pad_id, out / name
                    )
        ref.precompute_s = time.perf_counter() - t0
    fsdp.reshard(root)  # before the optimizer collects the parameters: the sharded ones
    return root.train(), ref


def make_optimizer(model, cfg: MPOConfig, d: Dist) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    """The trainable parameters (rank 0's in every process, as DistributedDataParallel starts) and
    AdamW over them, with no weight decay on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    if d.world > 1 and not d.sharded:  # sharded: every process loaded the same weights, seeded alike
        for p in params:
            dist.broadcast(p.data, 0)
    torch.manual_seed(cfg.seed + d.rank)  # but different dropout in each process
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas), fused=d.device.type == "cuda"
    )
    return params, optimizer


def save_final(model, processor, out: Path, cfg: MPOConfig, d: Dist) -> Path | None:
    """The trained model (LoRA merged), loadable by transformers and vLLM, with its processor, in
    out/final; None where nothing is written (`save_model` false, or not the main process)."""
    if not cfg.save_model:
        return None
    if d.sharded:  # every process sends its shards; the first writes the whole model
        weights = fsdp.full_state_dict(model)
        if not d.main:
            return None
        if cfg.lora:  # merged on a fresh CPU copy of the base model
            model = with_lora(
                load_model(cfg.model, cfg.dtype, cfg.attn_implementation, cfg.trust_remote_code), cfg
            )
            model.load_state_dict(weights)
            model.merge_and_unload().save_pretrained(out / "final")
        else:
            unwrap(model).save_pretrained(out / "final", state_dict=weights)
    elif not d.main:
        return None
    else:
        final = model.merge_and_unload() if cfg.lora else model
        final.save_pretrained(out / "final")
    processor.save_pretrained(out / "final")
    return out / "final"
