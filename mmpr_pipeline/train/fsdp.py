"""`strategy: fsdp`: the policy (and a live reference) sharded over the processes with PyTorch FSDP2.

`fully_shard` goes on each block the model names as indivisible (`_no_split_modules`: the decoder
layers and the vision-encoder blocks), on the LM head and the vision encoder's own parameters
(`outer_units`), then on a `LogpsModule` around the whole model as the root.
Each process then holds 1/N of the weights, gradients and AdamW states; a block's full weights exist
only while it runs. Gradients are reduce-scattered in float32 whatever the compute dtype (bf16 on
GPUs that have it, float32 on CPU), so N processes take the same steps as one.
"""

from __future__ import annotations

import ctypes
import logging
import os
from functools import partial

import torch
import torch.distributed as dist

from mmpr_pipeline.train.data import PairDataset, collate
from mmpr_pipeline.train.model import (
    HEAD_METHOD,
    PROJECTOR_NAMES,
    VISION_PREFIXES,
    LogpsModule,
    head_token_logps,
    unwrap,
)

log = logging.getLogger("mmpr.train")


def mixed_precision(use_bf16: bool):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16 if use_bf16 else None, reduce_dtype=torch.float32)


def shard(model, device: torch.device, use_bf16: bool, cpu_offload: bool, standin: dict | None):
    """`model` (transformers or peft) sharded block by block, inside a LogpsModule root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kw = dict(
        mesh=mesh,
        mp_policy=mixed_precision(use_bf16),
        offload_policy=CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy(),
    )
    blocks = set(getattr(unwrap(model), "_no_split_modules", None) or ())
    if not blocks:
        log.warning(
            "%s names no blocks (_no_split_modules): FSDP shards it as one unit", type(model).__name__
        )
    n = 0
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, **kw)
            if device.type == "cpu":
                # no streams to overlap a prefetched gather with: it would only hold a second
                # block whole (its own unit as the target: nothing left to fetch)
                module.set_modules_to_backward_prefetch([module])
            n += 1
    others = outer_units(model)
    for module in others:
        fully_shard(module, **kw)
    head = unwrap(model).get_output_embeddings()
    if head is not None and head in others:
        # the chunked LM head reads its weight directly: this method is its forward for FSDP
        setattr(head, HEAD_METHOD, partial(head_token_logps, head))
        register_fsdp_forward_method(head, HEAD_METHOD)
    root = LogpsModule(model, standin)
    fully_shard(root, **kw)
    log.info("fsdp: %d blocks, %d other units, the root: %d process(es)", n, len(others), mesh.size())
    return root


def outer_units(model) -> list[torch.nn.Module]:
    """The modules outside the blocks that get a unit of their own, so that the root holds less (its
    parameters stay gathered from the forward to the end of the backward, and their gradients whole
    until then): the LM head (unless tied to the input embeddings: one weight, one unit) and the
    vision encoder with its projector (patch embedding, merger). The input embeddings stay in the
    root: a process without an image runs the vision encoder on the stand-in image before the
    model embeds its tokens, one with an image after, and the units' gathers must come in one order."""
    inner = unwrap(model)
    units = []
    embed, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    if head is not None and not (embed is not None and head.weight is embed.weight):
        units.append(head)
    for name, module in inner.named_modules():
        last = name.rsplit(".", 1)[-1]
        if f"{last}." in VISION_PREFIXES or any(x in last for x in PROJECTOR_NAMES):
            if not any(module is m for u in units for m in u.modules()):  # not inside one already
                units.append(module)
    return [u for u in units if any(True for _ in u.parameters())]


def standin_batch(dataset: PairDataset, pad_id: int, device: torch.device) -> dict | None:
    """A one-pair batch, with an image if any pair has one, that a process runs when it has no pair
    of its own in a micro-batch (all dropped as too long, or past the end of its evaluation slice):
    FSDP's gathers are collective, so every process runs every forward. None: no pair fits."""
    fallback = None
    for i in range(len(dataset)):
        batch = collate([dataset[i]], pad_id)
        if not batch["n_pairs"]:
            continue
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if any(k.startswith("pixel_values") for k in batch):
            return batch
        fallback = fallback or batch
        if i >= 64:  # a text-only dataset: no need to read all of it
            break
    return fallback


def reshard(model) -> None:
    """Free the whole parameters a forward without backward left gathered (the root keeps its own
    after a forward, for the backward that follows in training): the module's parameters are then
    the sharded ones again, which the optimizer and checkpoints must see."""
    if hasattr(model, "reshard"):
        model.reshard()


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor; a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (every process gets it); a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# --- host memory (glibc) --------------------------------------------------------------------------

MMAP_THRESHOLD = 1 << 18
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to set
        return None


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Every host allocation over `nbytes` in a mapping of its own, returned to the kernel when freed.
    glibc starts so (at 128 KiB) but raises the threshold, up to 32 MiB, each time such a block is
    freed; from then on tensors of a weight's size come from its heaps, where freed memory stays in
    the process, fragmented. Training frees such tensors all the time (the whole weights once
    sharded, the blocks FSDP gathers, the unsharded gradients), and the heaps grew by ~300 MiB per
    process over the training state in bench_train_fsdp. A fixed threshold (as the environment's
    MALLOC_MMAP_THRESHOLD_ sets, which is left as the user set it) stops that. 256 KiB, not 1 MiB:
    a short batch's activations (2 x 100 tokens x 1024 floats = 800 KiB) stayed in the heaps too,
    120-145 MiB per process freed but held at the end of a backward (malloc_trim's count), and
    the FSDP peak was 80-100 MiB higher. False: not glibc."""
    libc = _libc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes))


def release_freed() -> None:
    """Hand back to the kernel the free pages in glibc's heaps (after the whole weights of a model
    are freed by sharding it)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


# --- checkpoints -----------------------------------------------------------------------------------


def _trainable_only(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # strict=False on loading: the frozen weights are not in the checkpoint, and stay as loaded
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def save_shards(path, model, optimizer) -> None:
    """Each process writes its own shards of the trainable weights and of AdamW's states to `path`
    (torch.distributed.checkpoint); frozen weights are the model's own, as in unsharded checkpoints."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer, options=_trainable_only())
    dcp.save({"model": weights, "optimizer": optim}, checkpoint_id=str(path))


def load_shards(path, model, optimizer) -> None:
    """The shards of `save_shards` back into the sharded model and optimizer (DCP reads each
    process's part, whatever process wrote it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    weights, optim = get_state_dict(model, optimizer, options=_trainable_only())
    state = {"model": weights, "optimizer": optim}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=_trainable_only(strict=False),
    )


def full_state_dict(root) -> dict[str, torch.Tensor]:
    """The whole model's weights, gathered on the first process's CPU (empty on the others), under
    the names of the model inside the LogpsModule root."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in state.items()}
