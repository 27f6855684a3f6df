"""The runs of tests/test_train_fsdp.py, as one `torchrun --nproc_per_node 2 --max-restarts 1` launch
(each launch costs seconds of imports): `python -m torch.distributed.run ... _fsdp_runs.py MODEL
DATA OUT`. The test runs the same CASES in one process with the default (unsharded) strategy to
compare.

After the CASES, "full" is run again with its shards and optimizer states in host memory
(cpu_offload) into OUT/offload, then once more into OUT/killed, where the second process SIGKILLs
itself once step 3's checkpoint is written. torchrun then ends the other process and starts both
again (TORCHELASTIC_RESTART_COUNT=1): this script, started again, only runs "killed" once more,
which resumes from that checkpoint."""

import os
import signal
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


KILL_STEP = 3


def kill_after_checkpoint(loop, out: Path) -> None:
    """The second process SIGKILLs itself as soon as step KILL_STEP's checkpoint is complete (every
    process has passed the barrier after its rename), leaving a marker that it did."""
    import torch.distributed as dist

    save = loop.save_checkpoint

    def save_then_die(output_dir, step, *args, **kwargs):
        save(output_dir, step, *args, **kwargs)
        if step == KILL_STEP and dist.get_rank() == 1:
            (out / f"killed-after-step-{step}").touch()
            os.kill(os.getpid(), signal.SIGKILL)

    loop.save_checkpoint = save_then_die


def record_resume(loop, out: Path) -> None:
    """A marker naming the step the run resumed at (0: it started over)."""
    import torch.distributed as dist

    resume = loop.resume

    def resume_and_record(*args, **kwargs):
        state = resume(*args, **kwargs)
        if dist.get_rank() == 0:
            (out / f"resumed-at-step-{state.step}").touch()
        return state

    loop.resume = resume_and_record


if __name__ == "__main__":
    import torch

    from mmpr_pipeline.train import loop, train

    torch.set_num_threads(1)
    model, data, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    killed = dict(strategy="fsdp", output_dir=str(out / "killed"))
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":  # started again after the kill
        record_resume(loop, out / "killed")
        train(config("full", model, data, out, 2, **killed))
        sys.exit(0)
    for name in CASES:
        train(config(name, model, data, out, 2, strategy="fsdp"))
    offload = dict(strategy="fsdp", cpu_offload=True, save_every=-1, output_dir=str(out / "offload"))
    train(config("full", model, data, out, 2, **offload))
    kill_after_checkpoint(loop, out / "killed")
    train(config("full", model, data, out, 2, **killed))
    raise SystemExit("the run meant to be killed at step 3 was not")
