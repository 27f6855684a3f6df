"""`mmpr train --plan`: parameter counts from a model's config alone, and the memory arithmetic per
strategy (pure logic; the plan against measured memory is benchmarks/bench_train_fsdp.py)."""

import json
import shutil

from mmpr_pipeline import cli
from mmpr_pipeline.train import MPOConfig
from mmpr_pipeline.train.model import freeze_vision, load_model
from mmpr_pipeline.train.plan import Counts, counts_from_config, plan


def test_counts_come_from_the_config_alone_and_match_the_loaded_model(tiny_model, tmp_path):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(f"{tiny_model}/config.json", config_only)  # no weights to read
    counts = counts_from_config(MPOConfig(model=str(config_only)))
    model = load_model(tiny_model)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.vision == freeze_vision(model) > 0  # what freeze_vision freezes is the vision count
    assert counts.projector > 0 and counts.largest_block > 0
    assert counts.lora > 0
    text = model.config.get_text_config()
    assert (counts.layers, counts.hidden) == (text.num_hidden_layers, text.hidden_size) and counts.kv > 0
    # FSDP's units: the blocks, the LM head and the vision encoder (its patch embedding and
    # projector); the root: what is left (the input embeddings, norms)
    blocks = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
    inner = model.model
    layer = sum(p.numel() for p in inner.language_model.layers[0].parameters())
    head = model.lm_head.weight.numel()
    outer = [model.lm_head, inner.visual.patch_embed, inner.visual.merger]
    vision = sum(p.numel() for m in outer[1:] for p in m.parameters())  # the vision unit, less its blocks
    assert counts.largest_block == max(layer, head, vision)
    units = sum(p.numel() for m in blocks + outer for p in m.parameters())
    rest = inner.language_model.embed_tokens.weight.numel() + inner.language_model.norm.weight.numel()
    assert counts.root == counts.total - units == rest


def test_plan_per_strategy():
    c = Counts(vision=100, projector=10, language=890, largest_block=50, lora=20, root=40)
    ddp = plan(c, MPOConfig(), 4, "ddp")
    # float32: weights 4 B, gradients and AdamW's two moments for the 900 trained, a frozen copy
    assert ddp == dict(
        weights=4000,
        gradients=3600,
        optimizer=7200,
        reference=4000,
        gathered=0,
        activations=0,
        host=0,
        total=18800,
    )
    fsdp = plan(c, MPOConfig(strategy="fsdp", bf16=False), 4, "fsdp")
    # the root's weights and gradients whole, and four of the largest block
    assert fsdp["weights"] == 1000 and fsdp["optimizer"] == 1800 and fsdp["gathered"] == (2 * 40 + 4 * 50) * 4
    assert fsdp["total"] == 18800 / 4 + 1120
    assert plan(c, MPOConfig(reference="precomputed"), 1, "ddp")["reference"] == 0
    lora = plan(c, MPOConfig(lora=True, dtype="bfloat16"), 1, "ddp")
    assert lora["gradients"] == 2 * 30 and lora["reference"] == 0  # adapters + projector; adapters off
    off = plan(c, MPOConfig(strategy="fsdp", cpu_offload=True), 2, "fsdp")
    assert off["host"] == off["total"] - off["gathered"] > 0


def test_activations_from_the_shapes():
    c = Counts(
        vision=0, projector=0, language=10**6, largest_block=10**5, layers=3, hidden=8, kv=4, intermediate=20
    )
    per_layer = 6 * 8 + 2 * 4 + 4 * 20  # values kept per token by a layer for its backward
    cfg = dict(batch_size=2, max_length=10, bf16=False)
    # chosen and rejected: 2 pairs x 2 sequences x 10 tokens, float32
    assert plan(c, MPOConfig(**cfg), 1, "ddp")["activations"] == 40 * 3 * per_layer * 4
    # checkpointed: each layer's input, and one layer's whole set while it is recomputed
    checkpointed = plan(c, MPOConfig(**cfg, gradient_checkpointing=True), 1, "ddp")
    assert checkpointed["activations"] == 40 * (3 * 8 + per_layer) * 4
    assert plan(c, MPOConfig(**cfg, weights=[0, 0, 1]), 1, "ddp")["activations"] == 20 * 3 * per_layer * 4
    # the same per process whatever the strategy
    assert plan(c, MPOConfig(**cfg, strategy="fsdp"), 4, "fsdp")["activations"] == 40 * 3 * per_layer * 4


def test_cli_plan_prints_without_loading_or_writing(tiny_model, tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"model: {tiny_model}\noutput_dir: {tmp_path / 'out'}\nstrategy: fsdp\n")
    assert cli.main(["train", "--plan", str(cfg), "--nproc", "2", "--json"]) == 0
    out = capsys.readouterr().out
    assert "ddp" in out and "fsdp" in out and "GiB per process" in out
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["bytes"]["fsdp"]["weights"] == figures["bytes"]["ddp"]["weights"] / 2
    assert not (tmp_path / "out").exists()
    assert cli.main(["train", "--plan", str(tmp_path / "missing.yaml")]) == 2


def test_strategy_keys_are_checked():
    from mmpr_pipeline.train import ConfigError

    assert MPOConfig().strategy == "ddp"  # the default stays data-parallel
    for bad, key in ((dict(strategy="zero3"), "strategy"), (dict(cpu_offload=True), "cpu_offload")):
        try:
            MPOConfig(**bad)
        except ConfigError as e:
            assert key in str(e)
        else:
            raise AssertionError(f"{bad} was accepted")
