"""The trainer computes the same MPO loss as TRL 1.16's `DPOTrainer` on the same batch.

One batch of four pairs, each with its generated image (tests/_run_fixture.py: the layout, schema
and prompt rendering of a real build), scored by the same policy and reference weights:
- ours: the first step of `mmpr_pipeline.train.train` (`bco_shift: none`), as metrics.jsonl logs it;
- TRL: `DPOTrainer(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])` on its
  own collated batch of the same pairs, each term through TRL's own `compute_loss`.

The one deliberate difference: TRL's completion is everything the chat template writes after the
prompt, so it also scores the "\\n" that Qwen's template puts after `<|im_end|>` between turns. Ours
ends at `<|im_end|>`, the last token the model generates (vLLM stops there), so a pair's
log-probability is that of the sampled response. With that token left out of TRL's completion mask,
every term agrees to 1e-4 relative; with it in, our scorer on TRL's batch gives TRL's numbers, so
the whole difference is that one token. Both average the SFT term per token over the batch's
chosen tokens (not per sequence).
"""

import copy
import json

import pytest
import torch
from _run_fixture import make_run

from mmpr_pipeline.train import MPOConfig, mpo_loss, train
from mmpr_pipeline.train.model import load_model, load_processor, response_logps

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
TERMS = {"sigmoid": "preference", "bco_pair": "bco", "sft": "sft"}
WEIGHTS = {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    """Four correctness pairs with images, the reference (the tiny model) and a policy that differs
    from it (the same weights, nudged), so that every term is away from its value at zero."""
    tmp = tmp_path_factory.mktemp("trl")
    run = make_run(tmp / "run", n_shapes=4, n_scenes=0, n_shards=1)
    import pyarrow.parquet as pq

    shard = next((run / "data").glob("*.parquet"))
    table = pq.read_table(shard)
    keep = [i for i, t in enumerate(table["pair_type"].to_pylist()) if t == "correctness"][:4]
    pq.write_table(table.take(keep), shard)
    processor = load_processor(tiny_model)
    reference = load_model(tiny_model).eval()
    policy = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    return run, processor, policy, reference, tmp


def ours(setup) -> dict:
    run, processor, policy, reference, tmp = setup
    cfg = MPOConfig(
        model="tiny",
        data=str(run),
        output_dir=str(tmp / "ours"),
        batch_size=4,
        max_steps=1,
        eval_fraction=0.0,
        bco_shift="none",
        weights=[0.8, 0.2, 1.0],
        beta=0.1,
        max_length=4096,
        learning_rate=1e-9,
        progress_bar=False,
        save_model=False,
        save_every=-1,
        resume=False,
    )
    train(cfg, model=copy.deepcopy(policy), processor=processor, ref_model=copy.deepcopy(reference))
    row = json.loads((tmp / "ours" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["pairs"] == 4 and row["delta"] == 0.0
    return row


def trl_trainer(setup):
    import datasets
    from trl import DPOConfig, DPOTrainer

    run, processor, policy, reference, tmp = setup
    ds = datasets.load_dataset("parquet", data_files=str(run / "data" / "*.parquet"), split="train")
    ds = ds.cast_column("images", datasets.List(datasets.Image()))
    ds = ds.map(
        lambda r: {
            "prompt": [{"role": "user", "content": r["question"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        },
        remove_columns=[c for c in ds.column_names if c != "images"],
    )
    args = DPOConfig(
        output_dir=str(tmp / "trl"),
        per_device_train_batch_size=4,
        beta=0.1,
        loss_type=["sigmoid", "bco_pair", "sft"],
        loss_weights=[0.8, 0.2, 1.0],
        max_length=None,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=args,
        train_dataset=ds,
        processing_class=processor,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer, batch


def trl_terms(trainer, batch) -> dict:
    """TRL's total and each of its terms (unweighted), from TRL's own loss code."""
    model = trainer.model.train()
    out = {}
    with torch.no_grad():
        out["loss"] = trainer.compute_loss(model, batch).item()
        types, weights = trainer.loss_types, trainer.loss_weights
        for t in types:
            trainer.loss_types, trainer.loss_weights = [t], [1.0]
            out[TERMS[t]] = trainer.compute_loss(model, batch).item()
        trainer.loss_types, trainer.loss_weights = types, weights
    return out


def without_trailing_newline(batch: dict, tokenizer) -> dict:
    """TRL's batch with the template's "\\n" after each completion's `<|im_end|>` left unscored."""
    batch = dict(batch)
    mask = batch["completion_mask"].clone()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for i in range(mask.shape[0]):
        last = int(mask[i].nonzero().max())
        assert (
            tokenizer.decode(batch["input_ids"][i, last]) == "\n" and batch["input_ids"][i, last - 1] == end
        )
        mask[i, last] = 0
    batch["completion_mask"] = mask
    return batch


def test_each_mpo_term_equals_trls_on_the_same_batch(setup):
    run, processor, policy, reference, tmp = setup
    trainer, batch = trl_trainer(setup)
    assert batch["pixel_values"].shape[0] > 0 and batch["input_ids"].shape[0] == 8  # 4 chosen, 4 rejected

    # The same sequences: TRL's, with its trailing "\n" left out, are token for token ours.
    from mmpr_pipeline.train.data import PairDataset, PairEncoder, load_pairs

    tok = processor.tokenizer
    trl_batch = without_trailing_newline(batch, tok)
    ds = PairDataset(load_pairs(run), PairEncoder(processor, 4096))
    encoded = {
        tuple(e.prompt["input_ids"][0].tolist() + e.chosen_ids): e for e in (ds[i] for i in range(len(ds)))
    }
    for i in range(4):  # chosen rows of TRL's batch (left-flushed, right-padded)
        ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()[:-1]  # without the "\n"
        e = encoded[tuple(ids)]
        assert trl_batch["input_ids"][i][trl_batch["completion_mask"][i].bool()].tolist() == e.chosen_ids
        rejected = batch["input_ids"][i + 4][trl_batch["completion_mask"][i + 4].bool()].tolist()
        assert rejected == e.rejected_ids

    mine = ours(setup)
    theirs = trl_terms(trainer, trl_batch)
    for key in ("preference", "bco", "sft", "loss"):
        assert mine[key] == pytest.approx(theirs[key], rel=1e-4), key
    # away from the values a policy equal to its reference gives (log 2, 2 log 2)
    assert abs(mine["preference"] - 0.6931) > 1e-3 and abs(mine["bco"] - 1.3863) > 1e-3
    assert theirs["loss"] == pytest.approx(
        0.8 * theirs["preference"] + 0.2 * theirs["bco"] + theirs["sft"], rel=1e-5
    )


def test_trls_default_differs_only_by_the_newline_after_the_end_of_turn(setup):
    """TRL's own numbers (trailing "\\n" scored) are what our scorer and loss give on TRL's batch."""
    run, processor, policy, reference, tmp = setup
    trainer, batch = trl_trainer(setup)
    theirs = trl_terms(trainer, batch)
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    inputs["response_mask"] = batch["completion_mask"].bool()
    with torch.no_grad():
        logps, n_tokens = response_logps(policy, inputs)
        ref, _ = response_logps(reference, inputs)
    chosen_nll = -logps[:4].sum() / n_tokens[:4].sum()  # per token over the batch's chosen tokens, as TRL
    loss, parts = mpo_loss(
        logps[:4], logps[4:], ref[:4], ref[4:], chosen_nll, beta=0.1, weights=(0.8, 0.2, 1.0)
    )
    for key in ("preference", "bco", "sft"):
        assert parts[key].item() == pytest.approx(theirs[key], rel=1e-4), key
    assert loss.item() == pytest.approx(theirs["loss"], rel=1e-4)
    # and that token matters: without it (our default) the terms move by more than the tolerance
    mine = ours(setup)
    assert max(abs(mine[k] / theirs[k] - 1) for k in ("preference", "bco", "sft")) > 4e-4  # 4x the tolerance
