"""Loading a vision-language model for training, and the log-probabilities of its responses.

Any model that `AutoModelForImageTextToText` and `AutoProcessor` load works: the backbone (vision
encoder + language model) gives hidden states, and only the response positions go through the LM
head, in chunks that are recomputed in the backward pass. The (tokens x vocabulary) logits of the
whole batch are never held in memory, which is most of a VLM's activation memory at 150k-token
vocabularies.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Parameter names of vision encoders in transformers' VLMs; their projectors (Qwen's `merger`,
# LLaVA's `multi_modal_projector`) stay trainable, as in the paper's reference code.
VISION_PREFIXES = ("visual.", "vision_tower.", "vision_model.", "vision_encoder.", "image_encoder.")
PROJECTOR_NAMES = ("merger", "projector", "connector")  # Qwen, LLaVA/InternVL/Gemma 3, Idefics3
LOGITS_PER_CHUNK = 2**25  # ~32M logits (128 MB in float32) at a time in the LM head
# The LM head's method that FSDP hooks as its forward when the head is a unit (fsdp.shard)
HEAD_METHOD = "token_logps"


def check_model_name(name: str) -> None:
    """A local folder that is missing gets a clear error instead of a Hub lookup of its path."""
    from pathlib import Path

    if Path(name).exists():
        return
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        hint = " (build it with `make demo-model`)" if "models/demo" in name else ""
        raise FileNotFoundError(
            f"no model folder {name}{hint}; give a local folder or a Hub id like org/name"
        )


def load_processor(name: str, max_pixels: int | None = None, trust_remote_code: bool = False):
    from transformers import AutoProcessor

    check_model_name(name)
    # An explicit False: transformers then refuses custom code instead of asking on the terminal.
    processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    if max_pixels is not None:
        ip = processor.image_processor
        if not (hasattr(ip, "merge_size") and hasattr(ip, "temporal_patch_size")):
            # CLIP/SigLIP-style processors resize to the encoder's fixed input (its position
            # embeddings have that size); a pixel cap there would be silently ignored.
            raise ValueError(
                f"max_pixels: {type(ip).__name__} (the image processor of {name}) sizes images by "
                f"its own settings ({_image_size(ip)}), not by a pixel budget; max_pixels only applies to "
                "Qwen2-VL-style processors: unset it"
            )
        ip.max_pixels = max_pixels
        if isinstance(getattr(ip, "size", None), dict) and "longest_edge" in ip.size:
            ip.size["longest_edge"] = max_pixels
    tok = getattr(processor, "tokenizer", processor)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return processor


def _image_size(ip) -> str:
    """The size settings of an image processor, as `size={...}, crop_size={...}`."""
    parts = []
    for attr in ("size", "crop_size", "max_image_size"):
        value = getattr(ip, attr, None)
        if value is not None:
            items = value.items() if isinstance(value, dict) else vars(value).items()
            parts.append(f"{attr}={ {k: v for k, v in items if v is not None} }")
    return ", ".join(parts) or "its own size"


def load_model(
    name: str,
    dtype: str = "float32",
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
):
    from transformers import AutoModelForImageTextToText

    check_model_name(name)
    kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(name, **kwargs)
    model.config.use_cache = False
    return model


def freeze_vision(model) -> int:
    """Freeze the vision encoder (not its projector); returns the number of frozen parameters."""
    n = 0
    for name, p in model.named_parameters():
        if any(f".{v}" in f".{name}" for v in VISION_PREFIXES) and not any(
            x in name for x in PROJECTOR_NAMES
        ):
            p.requires_grad_(False)
            n += p.numel()
    return n


def _in_vision_encoder(name: str) -> bool:
    return any(f".{v}" in f".{name}." for v in VISION_PREFIXES)


def projector_modules(model) -> list[str]:
    """Names of the projector modules (the outermost ones) between vision encoder and language model."""
    names = [n for n, _ in model.named_modules() if any(x in n.rsplit(".", 1)[-1] for x in PROJECTOR_NAMES)]
    return [n for n in names if not any(n.startswith(f"{m}.") for m in names)]


def add_lora(model, r: int, alpha: int, dropout: float, target_modules, freeze_vision: bool = True):
    """LoRA adapters on the language model; the projector is trained in full (`modules_to_save`: under
    LoRA the reference is the model with adapters off, which then uses the original projector).

    Under `freeze_vision` no adapter goes into the vision encoder: the default targets (q_proj, ...)
    also name the attention layers of CLIP and SigLIP towers (LLaVA, Gemma 3)."""
    from peft import LoraConfig, get_peft_model

    projectors = projector_modules(model)
    exclude = [
        n
        for n, _ in model.named_modules()
        if n
        and (
            (freeze_vision and _in_vision_encoder(n))
            or any(n == p or n.startswith(f"{p}.") for p in projectors)
        )
    ]
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        exclude_modules=exclude or None,
        modules_to_save=projectors or None,
    )
    return get_peft_model(model, config)


def unwrap(model):
    """The transformers model inside a peft wrapper or a LogpsModule (LoRA layers stay injected in
    its modules)."""
    model = policy_of(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def policy_of(model):
    """The (peft or transformers) model inside a LogpsModule; `model` itself otherwise."""
    return model.model if isinstance(model, LogpsModule) else model


class LogpsModule(torch.nn.Module):
    """`response_token_logps` as one module's forward: the root unit under FSDP, whose pre-forward
    gathers the parameters no other unit holds (the input embeddings, norms), and whose
    post-backward reduces their gradients.

    Every FSDP block is a collective: all processes must run the same blocks in the same order. A
    process whose micro-batch has no image would skip the vision blocks that the others run, so
    with `standin` (a one-pair batch with an image) it runs them on that image first, and adds
    the result times zero."""

    def __init__(self, model, standin: dict | None = None):
        super().__init__()
        self.model = model
        self.standin = standin

    def vision_keys(self) -> list[str]:
        from mmpr_pipeline.train.data import TOKEN_KEYS, model_inputs

        return [k for k in model_inputs(self.standin or {}) if k not in TOKEN_KEYS]

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.vision_keys()
        idle_vision = None
        if keys and not any(k in batch for k in keys):
            features = unwrap(self.model).get_image_features(**{k: self.standin[k] for k in keys})
            idle_vision = 0 * sum(t.float().sum() for t in _tensors(features))
        token_logps, mask = response_token_logps(self.model, batch)
        if idle_vision is not None:
            token_logps = token_logps + idle_vision
        return token_logps, mask


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in a model output (a tensor, a tuple or list, or a ModelOutput)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    softcap: float | None = None,
) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    if softcap:  # Gemma-style final logit soft-capping
        logits = softcap * torch.tanh(logits / softcap)
    return logits.gather(-1, labels[:, None]).squeeze(-1) - logits.logsumexp(-1)


def response_token_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-probability of every response token, in order (row-major over the batch), and the
    response mask they belong to (`batch["response_mask"][:, 1:]`, position t predicted from t - 1)."""
    from mmpr_pipeline.train.data import model_inputs

    inner = unwrap(model)
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = backbone(**model_inputs(batch), use_cache=False).last_hidden_state
    lm_head = inner.get_output_embeddings()
    # Token t is predicted from the hidden state at t - 1.
    mask = batch["response_mask"][:, 1:]
    h = hidden[:, :-1][mask]
    labels = batch["input_ids"][:, 1:][mask]
    softcap = getattr(inner.config.get_text_config(), "final_logit_softcapping", None)
    # under FSDP the head is a unit of its own, gathered around this call (fsdp.shard)
    hooked = getattr(lm_head, HEAD_METHOD, None)
    token_logps = hooked(h, labels, softcap) if hooked else head_token_logps(lm_head, h, labels, softcap)
    return token_logps, mask


def head_token_logps(
    lm_head: torch.nn.Module, h: torch.Tensor, labels: torch.Tensor, softcap: float | None
) -> torch.Tensor:
    """log p(labels) from hidden states `h` [tokens, hidden], the logits a chunk at a time."""
    chunk = max(16, LOGITS_PER_CHUNK // lm_head.weight.shape[0])
    pieces = []
    for s in range(0, h.shape[0], chunk):
        args = (h[s : s + chunk], lm_head.weight, lm_head.bias, labels[s : s + chunk], softcap)
        # Recompute each chunk's logits in backward instead of keeping them.
        pieces.append(
            checkpoint(_token_logps, *args, use_reentrant=False)
            if torch.is_grad_enabled()
            else _token_logps(*args)
        )
    return torch.cat(pieces) if pieces else h.new_zeros(0, dtype=torch.float32)


def response_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of the log-probabilities of the response tokens, and their counts.

    `batch` comes from `data.collate`; returns float32 tensors of shape [sequences].
    """
    token_logps, mask = model(batch) if isinstance(model, LogpsModule) else response_token_logps(model, batch)
    rows = mask.nonzero()[:, 0]  # boolean indexing is row-major, so this is each token's sequence
    seq_logps = torch.zeros(mask.shape[0], dtype=torch.float32, device=token_logps.device).index_add(
        0, rows, token_logps
    )
    return seq_logps, mask.sum(1)
