"""The runs of tests/test_train_fsdp.py, as one `torchrun --nproc_per_node 2` launch (each launch
costs seconds of imports): `python -m torch.distributed.run ... _fsdp_runs.py MODEL DATA OUT`.
The test runs the same CASES in one process with the default (unsharded) strategy to compare.

After the CASES, "full" is run again with its shards and optimizer states in host memory
(cpu_offload) into OUT/offload, then once more into OUT/resumed, where both processes SIGKILL
themselves in step 4 (after the step-3 checkpoint), as in a crash of the machine: the launch ends
there, failed. The test then resumes that run: `_fsdp_runs.py MODEL DATA OUT resume`."""

import os
import sys
from pathlib import Path

# float32, the full 0.8/0.2/1.0 mix, 5 steps of 4 pairs (2 per process); 20 training pairs, so that
# one process's micro-batches hold the same pairs as two processes' halves.
BASE = dict(
    max_steps=5,
    batch_size=4,
    limit=20,
    learning_rate=1e-3,
    warmup_ratio=0.0,
    eval_fraction=0.2,
    max_length=512,
    weights=[0.8, 0.2, 1.0],
    dtype="float32",
    progress_bar=False,
)
CASES = {
    # a live frozen reference, vision frozen; checkpoints at step 3 and 5
    "full": dict(save_every=3),
    # adapters trained against the adapters-off policy, with gradient checkpointing
    "lora": dict(lora=True, lora_r=4, lora_dropout=0.0, gradient_checkpointing=True, save_every=-1),
    # reference log-probs computed once by the sharded policy; the vision encoder trained too
    "precomputed": dict(reference="precomputed", freeze_vision=False, save_every=-1),
}


def config(name: str, model: str, data: str, out: Path, world: int, **kw):
    from mmpr_pipeline.train import MPOConfig

    case = {"model": model, "data": data, "output_dir": str(out / name), **BASE, **CASES[name], **kw}
    case["batch_size"] //= world
    return MPOConfig(**case)


if __name__ == "__main__":
    import torch

    from mmpr_pipeline.train import train

    torch.set_num_threads(1)
    model, data, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    resumed = dict(strategy="fsdp", output_dir=str(out / "resumed"))
    if sys.argv[4:] == ["resume"]:
        train(config("full", model, data, out, 2, **resumed))
        sys.exit(0)
    for name in CASES:
        train(config(name, model, data, out, 2, strategy="fsdp"))
    offload = dict(strategy="fsdp", cpu_offload=True, save_every=-1, output_dir=str(out / "offload"))
    train(config("full", model, data, out, 2, **offload))
    os.environ["MMPR_KILL_AT"] = "train_step:4"  # shards.kill_point: each process SIGKILLs itself
    train(config("full", model, data, out, 2, **resumed))
