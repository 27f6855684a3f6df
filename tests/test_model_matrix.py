"""Every family of `model_zoo` through the whole path (issue 14): `mmpr build` on real vLLM with a
correctness source and a DropoutNTP source, image tokens as the model itself counts them, `mmpr train`
(2 steps, full and LoRA) on the built pairs, and `mmpr export --format trl` through one step of TRL's
DPOTrainer. One tiny random-weight model and one build per family, shared by its checks.

A cell that vLLM on CPU cannot run is listed in CPU_RED with the error it raises: its test xfails
with that error quoted, so the cell stays red in the README's table, and the others are verified.
"""

from __future__ import annotations

import argparse
import io
import json
import math

import _shared_build
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from mmpr_pipeline import engine, export, model_zoo, pipeline, prompts, shards
from mmpr_pipeline import recipe as recipe_mod
from mmpr_pipeline.train import MPOConfig, train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
FAMILIES = list(model_zoo.FAMILIES)
CPU_RED: dict[str, str] = {}  # family -> the error vLLM on CPU raises (none today)
CAPTIONS = [
    *_shared_build.CAPTIONS,
    "Some bars and dots of different colours stand on a white ground in this small drawing here.",
]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(name, model folder) of one family, built once for all of its checks."""
    return request.param, str(
        model_zoo.build(request.param, tmp_path_factory.mktemp(request.param) / "model")
    )


def _recipe(model: str, d) -> dict:
    """A small build: 4 generated questions (correctness) and 4 captions (DropoutNTP, given responses)."""
    return dict(
        name="matrix",
        model=model,
        seed=0,
        prompt_template="cot_final_answer",
        engine={"max_model_len": 1024},
        sampling=dict(n=2, temperature=1.0, top_p=1.0, max_tokens=16),
        batch_size=8,
        unit_size=8,
        shard_rows=100,
        sources=[
            dict(
                name="shapes",
                loader="generated",
                generator={"seed": 1, "families": ["count", "color"]},
                limit=4,
                pipeline="correctness",
            ),
            *_shared_build.captions_source(d, CAPTIONS),
        ],
    )


@pytest.fixture(scope="module")
def built(family, tmp_path_factory, ray_local):
    name, model = family
    if name in CPU_RED:
        pytest.xfail(f"vLLM on CPU cannot run {name}: {CPU_RED[name]}")
    d = tmp_path_factory.mktemp(f"{name}-build")
    (d / "recipe.yaml").write_text(yaml.safe_dump(_recipe(model, d)))
    run = d / "run"
    stats = pipeline.build(recipe_mod.load(d / "recipe.yaml"), run)
    samples = [r for p in shards.unit_files(run) for r in pq.read_table(p).to_pylist()]
    return run, stats, samples


def _processor_image_tokens(model: str, image_bytes: bytes, question: str) -> int:
    """Image tokens in the sampling prompt as the model's own processor writes it (transformers)."""
    from transformers import AutoConfig, AutoProcessor

    processor = AutoProcessor.from_pretrained(model)
    ids = engine.image_token_ids(AutoConfig.from_pretrained(model), processor.tokenizer)
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    content = prompts.user_content(
        prompts.render("cot_final_answer", question), [image], lambda im: {"type": "image"}
    )
    messages = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = processor(text=[text], images=[image], return_tensors="pt", add_special_tokens=False)
    return sum(int((enc["input_ids"] == i).sum()) for i in ids)


def test_model_loads_in_transformers_with_every_weight(family):
    """The saved folder (vLLM's weight layout) loads in transformers with no weight missing or left over."""
    from transformers import AutoModelForImageTextToText

    _, model = family
    _, info = AutoModelForImageTextToText.from_pretrained(model, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_build_counts_the_models_own_image_tokens(family, built):
    """Every sampling prompt carries exactly the image tokens the model's processor writes for its
    image (the token comes from the model's config, not a fixed list); every DropoutNTP continuation
    prompt carries none, and the build made DropoutNTP pairs from the captions."""
    _, model = family
    run, stats, samples = built
    sampled = [s for s in samples if s["pipeline"] == "correctness"]
    assert len(sampled) == 4 and all(not s["error"] for s in sampled)
    for s in sampled:
        expected = _processor_image_tokens(model, s["images"][0], s["question"])
        assert expected > 0 and s["image_tokens"] == expected, (s["image_tokens"], expected)
        assert len(s["responses"]) == 2
    continued = [s for s in samples if s["pipeline"] == "dropout_ntp"]
    cut = [i for s in continued for i, w in enumerate(s["prefix_words"]) if w > 0]
    assert len(continued) == len(CAPTIONS) and len(cut) >= len(CAPTIONS)
    assert all(t == 0 for s in continued for t in s["continuation_image_tokens"])
    assert stats["totals"]["pairs"]["dropout_ntp"] >= len(CAPTIONS)


def _watch_the_reference(monkeypatch) -> dict:
    """Wrap the trainer's `make_reference` to keep, when training starts, a copy of the reference's
    weights (the frozen copy's, or under LoRA the base model's, which the reference is with the
    adapters off) and of the policy's, each by parameter object, to compare after training."""
    from mmpr_pipeline.train import loop

    seen: dict = {}
    make_reference = loop.make_reference

    def watched(model, *args, **kwargs):
        ref = make_reference(model, *args, **kwargs)
        reference = ref.model if ref.model is not None else model
        seen["reference"] = [(p, p.detach().clone()) for p in reference.parameters()]
        seen["policy"] = [(p, p.detach().clone()) for p in model.parameters()]
        return ref

    monkeypatch.setattr(loop, "make_reference", watched)
    return seen


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_train_two_steps(family, built, lora, tmp_path, monkeypatch):
    _, model = family
    run, _, _ = built
    seen = _watch_the_reference(monkeypatch)
    summary = train(
        MPOConfig(
            model=model,
            data=str(run),
            output_dir=str(tmp_path / "out"),
            batch_size=2,
            max_steps=2,
            learning_rate=1e-3,
            warmup_ratio=0.0,
            eval_fraction=0.0,
            max_length=1024,
            progress_bar=False,
            save_model=False,
            lora=lora,
            lora_r=4,
            lora_dropout=0.0,  # no dropout: a reference that moved with the policy gives rewards of exactly 0
        )
    )
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert summary["steps"] == 2 and len(train_rows) == 2 and summary["dropped"] == 0
    # step 1: the policy is its reference, so DPO = log 2, BCO = 2 log 2 (delta 0), SFT finite and > 0
    assert train_rows[0]["preference"] == pytest.approx(math.log(2), abs=1e-5)
    assert all(math.isfinite(r["loss"]) and r["sft"] > 0 for r in train_rows)
    # the reference's weights are the ones training started from, to the bit
    assert seen["reference"] and all(torch.equal(p, before) for p, before in seen["reference"])
    if not lora:  # the policy itself moved (under LoRA only its adapters do: the rewards below)
        assert not all(torch.equal(p, before) for p, before in seen["policy"])
    # step 2: the first update moved the policy and not its reference (a frozen copy, or the base
    # model under disabled adapters), so the rewards are away from 0 and DPO from log 2
    second = train_rows[1]
    assert abs(second["chosen_reward"]) > 1e-4 and abs(second["rejected_reward"]) > 1e-4, second
    assert abs(second["preference"] - math.log(2)) > 1e-6, second


def test_trl_export_passes_one_dpo_step(family, built, tmp_path):
    """`mmpr export --format trl` output goes through TRL's collator and one DPOTrainer step (MPO's mix)."""
    from _trl_step import trl_mpo_step
    from datasets import load_dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _, model_dir = family
    run, _, _ = built
    out = tmp_path / "trl"
    assert export.cli_export(argparse.Namespace(run_dir=str(run), format="trl", out=str(out))) == 0
    ds = load_dataset("parquet", data_dir=str(out / "data"), split="train", cache_dir=str(tmp_path / "cache"))
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    ref = AutoModelForImageTextToText.from_pretrained(model_dir)
    result = trl_mpo_step(model, ref, ds, processor, tmp_path / "dpo")
    assert result.global_step == 1 and math.isfinite(result.training_loss)


# --- family-specific defects (issue 14), each on the family that shows it ----------------------------


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return str(model_zoo.build("llava", tmp_path_factory.mktemp("llava-defects") / "model"))


@pytest.fixture(scope="module")
def pairs_run(tmp_path_factory):
    from test_train_loop import write_pairs

    return write_pairs(tmp_path_factory.mktemp("pairs"), 8, text_only_every=100)


def test_lora_under_freeze_vision_puts_no_adapter_in_clip_and_trains_the_projector(
    llava, pairs_run, tmp_path
):
    """LLaVA's CLIP attention layers are named q_proj/k_proj/v_proj like the language model's: under
    freeze_vision they get no adapter and keep their weights; the projector is trained (in full)."""
    from mmpr_pipeline.train.model import _in_vision_encoder, add_lora, freeze_vision, load_model

    model = load_model(llava)
    assert freeze_vision(model) > 0
    peft_model = add_lora(model, 4, 8, 0.0, MPOConfig().lora_target_modules)
    adapters = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert adapters and not [n for n in adapters if _in_vision_encoder(n.replace("base_model.model.", ""))]
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("multi_modal_projector" in n for n in trainable)
    # the reference (adapters off) keeps the original projector while the trained copy moves
    projector = peft_model.get_base_model().model.multi_modal_projector
    features = torch.randn(3, 64)
    with torch.no_grad():
        original = projector.original_module(features)
        for p in projector.parameters():
            if p.requires_grad:
                p.add_(0.1)
        with peft_model.disable_adapter():
            assert torch.equal(projector(features), original)
        assert not torch.allclose(projector(features), original)

    before = {k: v.clone() for k, v in load_model(llava).state_dict().items()}
    summary = train(
        MPOConfig(
            model=llava,
            data=str(pairs_run),
            output_dir=str(tmp_path / "out"),
            batch_size=2,
            max_steps=2,
            learning_rate=1e-2,
            warmup_ratio=0.0,
            eval_fraction=0.0,
            max_length=1024,
            progress_bar=False,
            save_model=True,
            lora=True,
            lora_r=4,
        )
    )
    after = load_model(summary["model_dir"]).state_dict()
    vision = [k for k in before if _in_vision_encoder(k) and "multi_modal_projector" not in k]
    projector = [k for k in before if "multi_modal_projector" in k]
    language = [k for k in before if "q_proj" in k and not _in_vision_encoder(k)]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert projector and any(not torch.equal(before[k], after[k]) for k in projector)
    assert language and any(not torch.equal(before[k], after[k]) for k in language)


# The first prompt token and the last response token each family's own convention asks for: LLaVA-1.5's
# template writes no BOS (its Llama tokenizer adds <s>) and ends the assistant turn with no end token
# (the trainer appends EOS); the others write their own BOS or none, and end turns with a special token.
SEQUENCE_START = {
    "qwen2_5_vl": "<|im_start|>",
    "llava": "<s>",
    "internvl": "<|im_start|>",
    "idefics3": "<|im_start|>",
    "gemma3": "<bos>",
}
TURN_END = {
    "qwen2_5_vl": "<|im_end|>",
    "llava": "</s>",
    "internvl": "<|im_end|>",
    "idefics3": "<end_of_utterance>",
    "gemma3": "<end_of_turn>",
}


def test_pairs_start_and_end_as_the_family_does(family, pairs_run):
    from mmpr_pipeline.train.data import PairDataset, PairEncoder, collate, load_pairs
    from mmpr_pipeline.train.model import load_processor

    name, model = family
    processor = load_processor(model)
    tok = processor.tokenizer
    dataset = PairDataset(load_pairs(pairs_run), PairEncoder(processor, 2048))
    item = dataset[1]
    prompt = tok.convert_ids_to_tokens(item.prompt["input_ids"][0].tolist())
    assert prompt[0] == SEQUENCE_START[name] and prompt.count(prompt[0]) == (
        1 if prompt[0] == tok.bos_token else 2
    )
    row = dataset.row(1)
    for ids, text in ((item.chosen_ids, row["chosen"]), (item.rejected_ids, row["rejected"])):
        end = tok.convert_ids_to_tokens(ids[-2:])
        assert end[-1] == TURN_END[name] and end[-2] not in TURN_END.values(), end
        assert text.strip().split()[-1] in tok.decode(ids[:-1])
    batch = collate([item], tok.pad_token_id)  # the end token is scored (the SFT term learns to stop)
    last = batch["response_mask"][0].nonzero().max()
    assert tok.convert_ids_to_tokens(int(batch["input_ids"][0, last])) == TURN_END[name]


def test_max_pixels_caps_qwen_images_and_is_refused_for_clip_style_processors(llava, pairs_run, tmp_path):
    """max_pixels is a pixel budget: Qwen's processor takes it (fewer image tokens); LLaVA's CLIP
    processor (shortest_edge + crop_size, the tower's fixed input) would ignore it, so it is refused."""
    from mmpr_pipeline.train.data import PairDataset, PairEncoder, load_pairs
    from mmpr_pipeline.train.model import load_processor

    qwen = str(model_zoo.build("qwen2_5_vl", tmp_path / "qwen"))
    image_pad = load_processor(qwen).tokenizer.convert_tokens_to_ids("<|image_pad|>")
    counts = [
        int(
            (
                PairDataset(load_pairs(pairs_run), PairEncoder(load_processor(qwen, mp), 2048))[1].prompt[
                    "input_ids"
                ]
                == image_pad
            ).sum()
        )
        for mp in (None, 28 * 28 * 4)
    ]
    assert counts == [16, 4]
    with pytest.raises(
        ValueError, match=r"max_pixels: CLIPImageProcessor .*shortest_edge.*crop_size.*unset it"
    ):
        train(
            MPOConfig(
                model=llava,
                data=str(pairs_run),
                output_dir=str(tmp_path / "out"),
                max_steps=1,
                max_pixels=28 * 28 * 4,
                progress_bar=False,
                save_model=False,
            )
        )


def test_sampling_starts_the_sequence_as_training_does_on_llava(llava, pairs_run):
    """LLaVA-1.5's template writes no BOS: the engine adds the tokenizer's `<s>`, as the trainer does,
    so the prompt vLLM samples from is token for token the one the trainer scores."""
    import asyncio

    from mmpr_pipeline.engine import Engine, user_message
    from mmpr_pipeline.records import decode_image
    from mmpr_pipeline.train.data import PairDataset, PairEncoder, load_pairs
    from mmpr_pipeline.train.model import load_processor

    dataset = PairDataset(load_pairs(pairs_run), PairEncoder(load_processor(llava), 2048))
    row, trained = dataset.row(1), dataset[1].prompt["input_ids"][0].tolist()
    engine = Engine(llava, {"max_model_len": 2048}, seed=0)
    try:
        message = user_message(row["question"], [decode_image(im["bytes"]) for im in row["images"]])
        sampled = asyncio.run(engine._render([message], continue_final=False))["prompt_token_ids"]
    finally:
        engine.shutdown()
    assert engine.add_bos and engine.llm.get_tokenizer().convert_ids_to_tokens(list(sampled[:1])) == ["<s>"]
    assert list(sampled) == trained
