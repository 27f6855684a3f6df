"""The MPO trainer end to end on CPU: a tiny Qwen2-VL model, pairs written as the pipeline writes them."""

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from mmpr_pipeline import demo_model, prompts, records, tasks
from mmpr_pipeline.train import ConfigError, MPOConfig, load_config, train
from mmpr_pipeline.train.data import PairDataset, PairEncoder, collate, load_pairs, model_inputs, split_pairs
from mmpr_pipeline.train.model import load_model, load_processor, response_logps

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


WRONG = {"A": "B", "B": "C", "C": "D", "D": "A", "Yes": "No", "No": "Yes"}


def write_pairs(run_dir: Path, n: int, seed: int = 0, text_only_every: int = 4) -> Path:
    """A run folder with one shard of `n` pairs (PAIR_SCHEMA); every `text_only_every`-th pair has no
    image. Chosen is the reference chain of thought; rejected is the same with a wrong final answer
    (correctness pairs) or without the final-answer line (format pairs), alternately."""
    rows = []
    for i, q in enumerate(tasks.generate(n, seed=seed)):
        wrong = WRONG.get(q["answer"]) or str(int(q["answer"]) + 1)
        chosen = q["response"]
        pair_type = "correctness" if i % 2 else "format"
        rejected = (
            f"{q['rationale']}\nFinal answer: {wrong}"
            if pair_type == "correctness"
            else f"{q['rationale']} I cannot say more."
        )
        images = [] if i % text_only_every == 0 else [{"bytes": q["image"], "path": None}]
        question = prompts.render("cot_final_answer", q["question"])
        qid = records.question_id("generated", q["image"], question, q["answer"])
        rows.append(
            dict(
                id=records.pair_id(qid, pair_type, chosen, rejected),
                qid=qid,
                source="generated",
                task=q["task"],
                images=images,
                question=question,
                answer=q["answer"],
                chosen=chosen,
                rejected=rejected,
                pair_type=pair_type,
                model="tiny",
                prompt_template="cot_final_answer",
                sampling="{}",
                chosen_index=0,
                rejected_index=1,
                cut_ratio=None,
                prefix_words=None,
            )
        )
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.Table.from_pylist(rows, schema=records.PAIR_SCHEMA),
        run_dir / "data" / "train-00000-of-00001.parquet",
    )
    return run_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return demo_model.build(tmp_path_factory.mktemp("model") / "tiny", "tiny")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("run"), 24)


def config(model, run_dir, out, **kw) -> MPOConfig:
    base = dict(
        model=str(model),
        data=str(run_dir),
        output_dir=str(out),
        batch_size=4,
        max_steps=4,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        eval_fraction=0.2,
        max_length=512,
        progress_bar=False,
        save_model=False,
    )
    return MPOConfig(**{**base, **kw})


def tiny_dir(summary: dict) -> str:
    return json.loads((Path(summary["output_dir"]) / "config.json").read_text())["model"]


def metrics(out: Path, split: str = "train") -> list[dict]:
    return [
        r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == split
    ]


# --- data ------------------------------------------------------------------------------------------


def test_prompt_uses_the_chat_template_and_only_responses_are_scored(tiny, run_dir):
    processor = load_processor(str(tiny))
    tok = processor.tokenizer
    table = load_pairs(run_dir)
    ds = PairDataset(table, PairEncoder(processor, 512))
    with_image, without = ds[1], ds[0]
    row = ds.row(1)
    prompt = tok.decode(with_image.prompt["input_ids"][0])
    assert prompt.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert prompt.endswith(row["question"] + "<|im_end|>\n<|im_start|>assistant\n")
    # the image is expanded into its tokens, never cut
    n_image_tokens = int((with_image.prompt["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).sum())
    assert n_image_tokens == int(with_image.prompt["image_grid_thw"].prod()) // 4  # 2x2 merge
    # responses end with the template's end-of-turn token, without the newline after it
    assert tok.decode(with_image.chosen_ids) == row["chosen"] + "<|im_end|>"
    assert tok.decode(with_image.rejected_ids) == row["rejected"] + "<|im_end|>"
    # a row without an image has no image tokens and no pixels
    assert "<|image_pad|>" not in tok.decode(without.prompt["input_ids"][0])
    assert "pixel_values" not in without.prompt

    batch = collate([without, with_image], tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4  # chosen, chosen, rejected, rejected
    for i, (item, ids) in enumerate(
        [
            (without, without.chosen_ids),
            (with_image, with_image.chosen_ids),
            (without, without.rejected_ids),
            (with_image, with_image.rejected_ids),
        ]
    ):
        assert batch["input_ids"][i][batch["response_mask"][i]].tolist() == ids
        assert batch["response_mask"][i, : item.prompt_len].sum() == 0
        assert batch["attention_mask"][i].sum() == item.prompt_len + len(ids)
    # the image appears once for the chosen and once for the rejected sequence
    assert batch["image_grid_thw"].shape[0] == 2
    assert batch["pixel_values"].shape[0] == 2 * with_image.prompt["pixel_values"].shape[0]


def test_split_holds_out_whole_questions(run_dir):
    table = load_pairs(run_dir)
    doubled = pa.concat_tables([table, table])  # two pairs per question
    train_t, eval_t = split_pairs(doubled, 0.25, seed=0)
    assert train_t.num_rows + eval_t.num_rows == doubled.num_rows and eval_t.num_rows > 0
    assert not set(train_t["qid"].to_pylist()) & set(eval_t["qid"].to_pylist())


def test_hub_dataset_with_the_same_columns(tiny, run_dir, monkeypatch):
    """A Hub id goes through `datasets.load_dataset` (stubbed here: no network), whose Image
    feature gives the same {bytes, path} structs as our shards."""
    import datasets

    shard = str(run_dir / "data" / "train-00000-of-00001.parquet")
    hub = datasets.Dataset.from_parquet(shard).cast_column("images", datasets.List(datasets.Image()))
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, split: asked.append((repo, split)) or hub)
    table = load_pairs("someone/mmpr-pairs:validation")
    assert asked == [("someone/mmpr-pairs", "validation")]
    assert (
        table.num_rows == 24 and table["question"].to_pylist() == pq.read_table(shard)["question"].to_pylist()
    )
    processor = load_processor(str(tiny))
    encoded = PairDataset(table, PairEncoder(processor, 512))[1]
    assert encoded.prompt["pixel_values"].shape[0] > 0


def test_bad_data_is_refused_with_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .parquet files"):
        load_pairs(tmp_path)
    pq.write_table(pa.table({"question": ["q"], "chosen": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['rejected'\]"):
        load_pairs(tmp_path / "x.parquet")
    pq.write_table(
        pa.table({"question": ["q"], "chosen": ["a"], "rejected": pa.array([None], pa.string())}),
        tmp_path / "x.parquet",
    )
    with pytest.raises(ValueError, match="'rejected' has 1 null"):
        load_pairs(tmp_path / "x.parquet")


def test_response_logps_match_a_full_forward_values_and_gradients(tiny, run_dir):
    processor = load_processor(str(tiny))
    model = load_model(str(tiny))
    ds = PairDataset(load_pairs(run_dir), PairEncoder(processor, 512))
    batch = collate([ds[i] for i in range(3)], processor.tokenizer.pad_token_id)
    ours, n_tokens = response_logps(model, batch)
    ours.sum().backward()
    grad_ours = model.lm_head.weight.grad.clone()
    model.zero_grad()
    logits = model(**model_inputs(batch), use_cache=False).logits[:, :-1].float()
    token = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    full = (token * batch["response_mask"][:, 1:]).sum(1)
    full.sum().backward()
    assert torch.allclose(ours, full, atol=1e-3)
    assert torch.allclose(grad_ours, model.lm_head.weight.grad, atol=1e-4)
    assert n_tokens.tolist() == batch["response_mask"].sum(1).tolist()
    # a pair scored alone gets the same log-probs as inside the padded batch
    alone, _ = response_logps(model, collate([ds[1]], processor.tokenizer.pad_token_id))
    assert torch.allclose(alone, torch.stack([ours[1], ours[4]]).detach(), atol=1e-3)


# --- training --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_run(tiny, run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("short")
    summary = train(config(tiny, run_dir, out, max_steps=12, save_model=True, eval_every=6))
    return out, summary


def test_short_run_loss_falls_and_reward_margin_grows(short_run):
    out, summary = short_run
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    first, last = rows[:3], rows[-3:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "loss") < mean(first, "loss") - 0.3
    assert mean(last, "reward_margin") > mean(first, "reward_margin") + 0.05
    for key in ("preference", "bco", "sft", "reward_accuracy", "delta", "tokens_per_s", "lr", "grad_norm"):
        assert all(key in r for r in rows)
    evals = metrics(out, "eval")
    assert [r["step"] for r in evals] == [6, 12] and evals[0]["eval_pairs"] == summary["eval_pairs"] > 0
    # held-out pairs (questions never trained on) are separable: chosen ends with the right answer,
    # rejected with a wrong one or without its final-answer line
    assert evals[-1]["eval_reward_accuracy"] > 0.5 and evals[-1]["eval_reward_margin"] > 0
    # the trained model is a model transformers loads; the vision encoder was frozen, its projector not
    final = load_model(summary["model_dir"])
    assert final.config.model_type == "qwen2_vl"
    before, after = (
        load_file(Path(tiny_dir(summary)) / "model.safetensors"),
        load_file(Path(summary["model_dir"]) / "model.safetensors"),
    )
    vision = [k for k in before if ".visual." in f".{k}" and "merger" not in k]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in before if "merger" in k)
    assert any(not torch.equal(before[k], after[k]) for k in before if ".layers." in k and "visual" not in k)
    assert (Path(summary["model_dir"]) / "tokenizer.json").exists()


def test_training_raises_held_out_chosen_over_rejected(short_run, tiny, run_dir):
    """Direction, scored outside the training loop: on held-out pairs, the trained model's
    log pi(chosen) - log pi(rejected) rose against the base model's. (The trainer's own logged
    margin grows whichever way round it is given the pairs; this does not.)"""
    out, summary = short_run
    processor = load_processor(str(tiny))
    _, held_out = split_pairs(load_pairs(run_dir), 0.2, seed=42)  # the trainer's split (eval_fraction, seed)
    assert held_out.num_rows == summary["eval_pairs"]
    ds = PairDataset(held_out, PairEncoder(processor, 512))
    batch = collate([ds[i] for i in range(len(ds))], processor.tokenizer.pad_token_id)
    n = batch["n_pairs"]
    margins = {}
    for name, path in (("base", str(tiny)), ("trained", summary["model_dir"])):
        with torch.no_grad():
            logps, _ = response_logps(load_model(path), batch)
        margins[name] = logps[:n] - logps[n:]
    gain = margins["trained"] - margins["base"]
    assert gain.mean() > 1.0 and (gain > 0).float().mean() > 0.5


def test_delta_is_the_running_mean_of_step_rewards(short_run):
    rows = metrics(short_run[0])
    step_means = [(r["chosen_reward"] + r["rejected_reward"]) / 2 for r in rows]
    for t, r in enumerate(rows, start=1):
        assert r["delta"] == pytest.approx(sum(step_means[:t]) / t, abs=1e-5)
    assert rows[0]["delta"] == pytest.approx(step_means[0], abs=1e-6)  # updated before it is used


def test_bco_shift_none_keeps_delta_at_zero(tiny, run_dir, tmp_path):
    train(config(tiny, run_dir, tmp_path, max_steps=2, bco_shift="none"))
    assert all(r["delta"] == 0.0 for r in metrics(tmp_path))


def test_resume_ends_where_an_uninterrupted_run_ends(tiny, run_dir, tmp_path):
    kw = dict(max_steps=4, save_every=2, batch_size=2, grad_accum_steps=2, warmup_ratio=0.3, save_model=True)
    whole = train(config(tiny, run_dir, tmp_path / "whole", **kw))
    # "interrupted" after step 2: a fresh folder holding only that checkpoint
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-000002", tmp_path / "resumed" / "checkpoint-000002")
    resumed = train(config(tiny, run_dir, tmp_path / "resumed", **kw))
    a = load_file(Path(whole["model_dir"]) / "model.safetensors")
    b = load_file(Path(resumed["model_dir"]) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["delta"] == whole["delta"]
    assert [r["step"] for r in metrics(tmp_path / "resumed")] == [3, 4]
    assert [r["loss"] for r in metrics(tmp_path / "resumed")] == [
        r["loss"] for r in metrics(tmp_path / "whole")
    ][2:]


# LoRA without dropout: a reference that were the adapted policy would give rewards of exactly 0 at
# every step; a warm-up over half the steps and a floor under the cosine, so the schedule shows.
LORA = dict(lora=True, lora_r=4, lora_dropout=0.0, max_steps=4, warmup_ratio=0.5, min_lr_ratio=0.1)


@pytest.fixture(scope="module")
def lora_run(tiny, run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    return out, train(config(tiny, run_dir, out, save_model=True, **LORA))


def test_lora_trains_adapters_against_the_base_model(tiny, lora_run):
    out, summary = lora_run
    rows = metrics(out)
    # adapters start at zero: the policy is the reference, every reward is exactly 0 at step 1
    assert rows[0]["chosen_reward"] == 0.0 and rows[0]["rejected_reward"] == 0.0
    # later, the base model is the reference: rewards away from 0 (exactly 0 were it the policy)
    assert all(abs(r["chosen_reward"]) > 1e-2 and abs(r["rejected_reward"]) > 1e-2 for r in rows[1:])
    assert rows[-1]["reward_margin"] > 0
    trainable = torch.load(out / "checkpoint-000004" / "state.pt", weights_only=False)["trainable"]
    # adapters, and the projector (Qwen's merger) in full, as under freeze_vision without LoRA
    assert trainable and all("lora_" in name or ".merger.modules_to_save." in name for name in trainable)
    assert any(".merger." in name for name in trainable)
    adapters = sum(t.numel() for name, t in trainable.items() if "lora_" in name)
    assert adapters < 0.2 * sum(p.numel() for p in load_model(str(tiny)).parameters())
    assert summary["trainable_parameters"] == sum(t.numel() for t in trainable.values())
    # the saved model has the adapters merged: a plain transformers model, changed from the base
    base, merged = (
        load_file(Path(tiny) / "model.safetensors"),
        load_file(Path(summary["model_dir"]) / "model.safetensors"),
    )
    assert set(base) == set(merged)
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all("proj" in k or ".merger." in k for k in changed)


def test_lora_live_reference_gives_the_precomputed_base_model_loss(tiny, run_dir, lora_run, tmp_path):
    """The live LoRA reference (the policy with its adapters disabled) scores as the base model's
    log-probabilities precomputed before LoRA is added: each loss term, step by step."""
    train(config(tiny, run_dir, tmp_path, reference="precomputed", **LORA))
    live, pre = metrics(lora_run[0]), metrics(tmp_path)
    assert [r["step"] for r in live] == [r["step"] for r in pre] == [1, 2, 3, 4]
    for a, b in zip(live, pre):
        for key in ("loss", "preference", "bco", "sft", "chosen_reward", "rejected_reward", "delta"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), (a["step"], key)


def test_logged_learning_rate_is_the_warmup_then_cosine_schedule(lora_run):
    # 4 steps, warmup_ratio 0.5: 2 warm-up steps to the peak (1e-3), then a cosine over the other 2
    # from the peak down towards min_lr_ratio 0.1 of it: 0.1 + 0.9 * (1 + cos(pi * k / 2)) / 2
    peak, floor = 1e-3, 0.1
    expected = [peak * 1 / 2, peak * 2 / 2] + [
        peak * (floor + (1 - floor) * (1 + math.cos(math.pi * k / 2)) / 2) for k in (0, 1)
    ]
    assert [r["lr"] for r in metrics(lora_run[0])] == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx([5e-4, 1e-3, 1e-3, 5.5e-4])


def test_precomputed_reference_gives_the_live_reference_loss(tiny, run_dir, tmp_path):
    live = train(config(tiny, run_dir, tmp_path / "live", max_steps=3))
    # (with gradient checkpointing, which must not change a number either)
    pre = train(
        config(
            tiny, run_dir, tmp_path / "pre", max_steps=3, reference="precomputed", gradient_checkpointing=True
        )
    )
    assert (tmp_path / "pre" / "reference_logps.pt").exists()
    for a, b in zip(metrics(tmp_path / "live"), metrics(tmp_path / "pre")):
        for key in ("loss", "preference", "bco", "reward_margin", "delta"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    assert live["last_eval"]["eval_reward_margin"] == pytest.approx(
        pre["last_eval"]["eval_reward_margin"], abs=1e-4
    )


def test_too_long_pairs_are_dropped_counted_and_reported(tiny, run_dir, tmp_path, caplog):
    lengths = []
    processor = load_processor(str(tiny))
    ds = PairDataset(load_pairs(run_dir), PairEncoder(processor, 10_000))
    for i in range(len(ds)):
        e = ds[i]
        lengths.append(e.prompt_len + max(len(e.chosen_ids), len(e.rejected_ids)))
    limit = sorted(lengths)[len(lengths) // 2]
    with caplog.at_level(logging.WARNING, logger="mmpr.train"):
        summary = train(config(tiny, run_dir, tmp_path, max_length=limit, max_steps=3, eval_fraction=0.0))
    assert summary["dropped"] > 0
    assert "over max_length" in caplog.text and "dropped" in caplog.text
    rows = metrics(tmp_path)
    assert rows[-1]["dropped"] == summary["dropped"]
    assert sum(r["pairs"] for r in rows) + summary["dropped"] == 3 * 4  # every pair is trained on or counted


def test_sft_only_needs_neither_reference_nor_rejected(tiny, run_dir, tmp_path):
    processor = load_processor(str(tiny))
    ds = PairDataset(load_pairs(run_dir), PairEncoder(processor, 512, with_rejected=False))
    assert collate([ds[0], ds[1]], processor.tokenizer.pad_token_id)["input_ids"].shape[0] == 2
    summary = train(config(tiny, run_dir, tmp_path, weights=[0.0, 0.0, 1.0], max_steps=6))
    rows = metrics(tmp_path)
    assert set(rows[0]) >= {"loss", "sft"} and "reward_margin" not in rows[0]
    assert rows[-1]["sft"] < rows[0]["sft"]
    assert summary["last_eval"]["eval_sft"] > 0


def test_qwen2_5_vl_trains_through_the_auto_classes(run_dir, tmp_path):
    """Another family: a tiny random Qwen2.5-VL (window attention in its vision encoder), saved and
    loaded through AutoModelForImageTextToText / AutoProcessor like any Hub checkpoint."""
    from mmpr_pipeline import model_zoo

    model_zoo.build_qwen2_5_vl(tmp_path / "q25")  # the builder `python -m mmpr_pipeline.model_zoo` uses

    processor, model = load_processor(str(tmp_path / "q25")), load_model(str(tmp_path / "q25"))
    assert model.config.model_type == "qwen2_5_vl"
    ds = PairDataset(load_pairs(run_dir), PairEncoder(processor, 512))
    batch = collate([ds[i] for i in range(3)], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        ours, _ = response_logps(model, batch)
        logits = model(**model_inputs(batch), use_cache=False).logits[:, :-1].float()
    token = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    assert torch.allclose(ours, (token * batch["response_mask"][:, 1:]).sum(1), atol=1e-3)
    summary = train(config(tmp_path / "q25", run_dir, tmp_path / "out", max_steps=3))
    rows = metrics(tmp_path / "out")
    # step 1: the policy is its reference, so every reward is 0: DPO = log 2, BCO = 2 log 2 (delta 0)
    assert rows[0]["preference"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["bco"] == pytest.approx(2 * math.log(2), abs=1e-6)
    assert rows[0]["loss"] == pytest.approx(
        0.8 * math.log(2) + 0.2 * 2 * math.log(2) + rows[0]["sft"], abs=1e-5
    )
    assert rows[-1]["sft"] < rows[0]["sft"] and rows[-1]["reward_margin"] > 0  # it learns
    assert summary["last_eval"]["eval_pairs"] > 0 and summary["last_eval"]["eval_reward_margin"] > 0


# --- config and CLI ----------------------------------------------------------------------------------


def test_default_config_and_overrides():
    cfg = load_config(ROOT / "data_cards" / "train_mpo.yaml", {"learning_rate": 1e-4, "lora": True})
    assert cfg.model == "build/models/demo" and cfg.data == "runs/demo"
    assert cfg.weights == [0.8, 0.2, 1.0] and cfg.beta == 0.1 and cfg.learning_rate == 1e-4 and cfg.lora
    with pytest.raises(ConfigError, match="learning_rat: unknown key"):
        load_config(ROOT / "data_cards" / "train_mpo.yaml", {"learning_rat": 1.0})
    with pytest.raises(ConfigError, match="weights: expected three non-negative"):
        load_config(ROOT / "data_cards" / "train_mpo.yaml", {"weights": [1, 2]})
    with pytest.raises(ConfigError, match="reference: expected live or precomputed"):
        load_config(ROOT / "data_cards" / "train_mpo.yaml", {"reference": "copy"})


def test_cli_train(tiny, run_dir, tmp_path, capsys):
    from mmpr_pipeline import cli

    out = tmp_path / "out"
    args = [
        "train",
        str(ROOT / "data_cards" / "train_mpo.yaml"),
        "--set",
        f"model={tiny}",
        "--set",
        f"data={run_dir}",
        "--set",
        f"output_dir={out}",
        "--set",
        "max_steps=2",
        "--set",
        "batch_size=2",
        "--set",
        "grad_accum_steps=1",
        "--set",
        "progress_bar=false",
    ]
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out)["model_dir"] == str(out / "final")
    assert (out / "final" / "model.safetensors").exists() and len(metrics(out)) == 2
    # no data: said first, even where output_dir holds a checkpoint of another config
    no_data = ["--set", f"data={tmp_path}/none", "--set", f"output_dir={out}", "--set", "max_steps=3"]
    assert cli.main(["train", str(ROOT / "data_cards" / "train_mpo.yaml"), *no_data]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_data_parallel_with_torchrun_matches_one_process(tiny, run_dir, tmp_path):
    """Two processes with 2 pairs each take the same steps as one process with 4 pairs, with the full
    MPO mix (0.8/0.2/1.0): the DPO and BCO terms are per-pair means (the mean of the halves' means),
    the SFT term is per token over the whole micro-batch (its token count is summed over processes),
    and the BCO shift delta takes one mean reward per process."""
    script = tmp_path / "ddp.py"
    script.write_text(
        "import sys\nfrom mmpr_pipeline.train import MPOConfig, train\n"
        f"train(MPOConfig(model={str(tiny)!r}, data={str(run_dir)!r}, output_dir=sys.argv[1],"
        " batch_size=int(sys.argv[2]), max_steps=3, learning_rate=1e-3, warmup_ratio=0.0,"
        " eval_fraction=0.2, max_length=512, progress_bar=False,"
        " weights=[0.8, 0.2, 1.0], bco_shift='running_mean'))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "4"], check=True, env=env, cwd=ROOT)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(tmp_path / "two"),
            "2",
        ],
        check=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["pairs"] for r in two] == [4, 4, 4]
    # the halves differ in length, so a per-process per-token SFT mean would not match
    assert len({r["tokens"] for r in one}) > 1
    for key in ("loss", "preference", "bco", "sft", "delta", "reward_margin"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], abs=1e-5), key
    assert one[-1]["delta"] != 0.0 and one[-1]["sft"] > 0
    a, b = (
        load_file(tmp_path / "one" / "final" / "model.safetensors"),
        load_file(tmp_path / "two" / "final" / "model.safetensors"),
    )
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    e1, e2 = metrics(tmp_path / "one", "eval")[-1], metrics(tmp_path / "two", "eval")[-1]
    assert e1["eval_pairs"] == e2["eval_pairs"] > 0
