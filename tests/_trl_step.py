"""One step of TRL's DPOTrainer with the MPO mix on an exported dataset: the check that an export is
something TRL trains on (tests/test_export.py, tests/test_model_matrix.py)."""

from pathlib import Path


def trl_mpo_step(model, ref, dataset, processor, out: Path):
    """TRL 1.16 `DPOTrainer`, loss_type sigmoid + bco_pair + sft weighted 0.8/0.2/1.0, one step on CPU."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=2,
        max_steps=1,
        report_to="none",
        loss_type=["sigmoid", "bco_pair", "sft"],
        loss_weights=[0.8, 0.2, 1.0],
        use_cpu=True,
        gradient_checkpointing=False,
        save_strategy="no",
        bf16=False,
        logging_steps=1,
    )
    return DPOTrainer(
        model=model, ref_model=ref, args=args, train_dataset=dataset, processing_class=processor
    ).train()
