"""The vLLM engine as the pipeline uses it: settings, chat prompts with images, n samples per prompt.

One `Engine` per Ray actor replica, built on vLLM's async engine (`AsyncLLM`): every question is its
own request, and requests of several batches are in flight at once, so the engine never drains
while a batch waits on its longest response. All of a question's samples come out of one request
(`SamplingParams(n=...)`), so they stay together. Prompts are rendered by vLLM's own chat renderer
(the one `LLM.chat` uses), so each model's chat template places its image tokens; DropoutNTP's
continuation uses text-only messages and `continue_final_message=True`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mmpr_pipeline.recipe import DEMO_JUDGE, DEMO_MODEL
from mmpr_pipeline.records import WHITE, decode_image

log = logging.getLogger(__name__)

# Settings that work on a CPU (see README, "vLLM on CPU"); a GPU uses vLLM's own defaults
# unless the recipe's `engine:` says otherwise.
# Chunked prefill is off on CPU because per-request seeds crash with it there.
# The model runs inside vLLM's engine-core process ("uni"): otherwise vLLM on CPU starts one more
# process for it, which imports torch and vLLM again (~25 CPU-seconds per engine start; the resume
# test's build 108 -> 87 s, the same samples). AsyncLLM keeps its engine core in a process of its own
# either way; VLLM_ENABLE_V1_MULTIPROCESSING=0 is what lets the CPU platform keep "uni".
CPU_DEFAULTS = dict(
    enforce_eager=True,
    dtype="bfloat16",
    max_model_len=2048,
    enable_chunked_prefill=False,
    distributed_executor_backend="uni",
)
# Every question has its own image, used by one request (its n samples share it): vLLM's cache of
# processed images would only grow (up to 4 GiB per replica by default), never hit.
COMMON_DEFAULTS = dict(limit_mm_per_prompt={"image": 1}, mm_processor_cache_gb=0)
# Keys of the recipe's `engine:` that are ours, not vLLM's.
PIPELINE_ENGINE_KEYS = ("stall_timeout_s", "max_concurrent_batches", "max_sequences_in_flight", "cpu_threads")
STALL_TIMEOUT_S = 600.0  # a request with no result for this long means the engine is stuck
# Batches (work units) each replica holds at once. A batch keeps its slot until its longest response
# ends, so with few slots the engine drains behind the batches' tails (benchmarks/bench_sampling.py:
# 4 slots ran at 0.60 of all-at-once, 16 at 1.02). What the engine is sent is bounded separately,
# by the sequence window below.
MAX_CONCURRENT_BATCHES = 16


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is an install problem reported elsewhere
        return False


def resolve_model(model: str) -> str:
    """`demo` means the bundled model, built and trained locally on first use."""
    if model == DEMO_MODEL:
        from mmpr_pipeline import demo_model

        return str(demo_model.ensure_trained())
    if model == DEMO_JUDGE:
        from mmpr_pipeline import demo_judge

        return str(demo_judge.ensure_judge())
    return model


def engine_kwargs(model: str, options: dict[str, Any], seed: int) -> dict[str, Any]:
    kwargs = dict(COMMON_DEFAULTS)
    if not has_gpu():
        kwargs.update(CPU_DEFAULTS)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    elif gpus_per_replica(options) > 1:
        # vLLM's workers then live in the actor's placement group (see `replica_plan`).
        kwargs["distributed_executor_backend"] = "ray"
    kwargs.update({k: v for k, v in options.items() if k not in PIPELINE_ENGINE_KEYS})
    kwargs.update(model=model, seed=seed)
    return kwargs


def cpu_threads(options: dict[str, Any]) -> int:
    """OpenMP threads of an engine on CPU: the recipe's `engine.cpu_threads`, else as many as the cores
    vLLM's own binding names (VLLM_CPU_OMP_THREADS_BIND, e.g. "0-3"; the tests pin each worker's
    engines to one core), else every core this process may run on, as `vllm.LLM` in a plain process
    uses. Never Ray's OMP_NUM_THREADS: Ray sets it to the actor's num_cpus (1), and the engine core
    vLLM spawns inherited it, so a CPU build sampled on one core while the bare engine used all
    (benchmarks/bench_e2e.py, 1,000 questions on 2 cores: the build 160.0 s on one, 131.0 s on two)."""
    if options.get("cpu_threads"):
        return int(options["cpu_threads"])
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    if bind not in ("auto", "nobind") and "|" not in bind:  # one engine's list of cores
        from vllm.utils.cpu_resource_utils import parse_id_list  # read as vLLM reads it

        return len(parse_id_list(bind))
    return len(os.sched_getaffinity(0))


@contextlib.contextmanager
def engine_core_threads(options: dict[str, Any]):
    """OMP_NUM_THREADS = cpu_threads(options) while vLLM spawns its engine core (read as it starts), on
    CPU; restored after, so nothing else this process starts later inherits it."""
    from mmpr_pipeline.env_vars import env_var

    if has_gpu():
        yield
        return
    with env_var("OMP_NUM_THREADS", str(cpu_threads(options))):
        yield


def gpus_per_replica(options: dict[str, Any]) -> int:
    return int(options.get("tensor_parallel_size", 1)) * int(options.get("pipeline_parallel_size", 1))


@dataclass
class ReplicaPlan:
    """How many engine replicas a cluster holds, and what each one reserves."""

    replicas: int
    bundles: list[dict[str, float]]  # one placement group per replica, STRICT_PACK (one node)
    gpus_per_replica: int


def replica_plan(node_gpus: list[float], options: dict[str, Any]) -> ReplicaPlan:
    """One replica per `tensor_parallel_size x pipeline_parallel_size` GPUs *of one node* (vLLM's
    workers of a replica must share a node), as many as the nodes allow. With no GPU: one CPU replica."""
    per = gpus_per_replica(options)
    replicas = sum(int(g) // per for g in node_gpus)
    if not any(node_gpus):
        return ReplicaPlan(replicas=1, bundles=[{"CPU": 1}], gpus_per_replica=0)
    if replicas == 0:
        raise ValueError(
            f"no node has the {per} GPUs one engine replica needs "
            f"(tensor_parallel_size x pipeline_parallel_size); nodes have {node_gpus}"
        )
    # As Ray Data LLM does: the actor takes the first bundle; vLLM's other workers the rest.
    return ReplicaPlan(
        replicas=replicas, bundles=[{"GPU": 1, "CPU": 1} for _ in range(per)], gpus_per_replica=per
    )


def actor_options(plan: ReplicaPlan) -> dict[str, Any]:
    """`map_batches` keyword arguments that place one replica per placement group."""
    if plan.gpus_per_replica == 0:
        return dict(num_cpus=1)
    if plan.gpus_per_replica == 1:
        return dict(num_gpus=1)

    def per_actor_placement() -> dict[str, Any]:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = placement_group(plan.bundles, strategy="STRICT_PACK")
        return dict(
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)
        )

    return dict(num_gpus=0, num_cpus=0, ray_remote_args_fn=per_actor_placement)


@dataclass
class Completion:
    """All samples of one request."""

    texts: list[str] = field(default_factory=list)
    n_tokens: list[int] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    prompt_token_ids: list[int] = field(default_factory=list)
    error: str = ""
    # each sample's summed log-probability, when the request asked for logprobs (else None)
    logprobs: list[float | None] = field(default_factory=list)


def user_message(text: str, images=None) -> dict[str, Any]:
    """A user turn with its images (PIL; one image or a list), placed as prompts.user_content says:
    at the text's `<image>` placeholders, else first."""
    from mmpr_pipeline.prompts import user_content

    if images is not None and not isinstance(images, (list, tuple)):
        images = [images]
    return {
        "role": "user",
        "content": user_content(text, list(images or []), lambda im: {"type": "image_pil", "image_pil": im}),
    }


def conversation(row: dict[str, Any], with_image: bool = True, background=WHITE) -> list[dict]:
    """The user turn the model sees for a question row: its rendered prompt template, with its images
    unless dropped (decoded by records.decode_image, transparency over the source's
    `image_background`)."""
    from mmpr_pipeline.prompts import render

    images = [decode_image(b, background) for b in row["images"]] if with_image else []
    return [user_message(render(row["prompt_template"], row["question"]), images)]


class SequenceWindow:
    """At most `limit` sequences admitted to the engine at once; a request of n samples takes n.
    Requests queue here before their images are decoded and rendered, so a replica holds processed
    images only for what the engine runs now or next; the rest wait as encoded bytes. Waiters are
    admitted in arrival order, so earlier batches finish first."""

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self.used = 0
        self._free: asyncio.Condition | None = None  # made on first use, in the loop that runs requests
        self._queue: collections.deque = collections.deque()  # waiting requests, in arrival order

    @contextlib.asynccontextmanager
    async def take(self, n: int):
        n = min(max(1, n), self.limit)
        if self._free is None:
            self._free = asyncio.Condition()
        turn = object()
        async with self._free:
            self._queue.append(turn)
            try:  # strictly first come, first served: a wide request is never starved by narrow ones
                await self._free.wait_for(lambda: self._queue[0] is turn and self.used + n <= self.limit)
            finally:
                self._queue.remove(turn)
                self._free.notify_all()
            self.used += n
        try:
            yield
        finally:
            async with self._free:
                self.used -= n
                self._free.notify_all()


class EngineStalled(RuntimeError):
    """The engine gave no result within the stall timeout: it is dead or stuck."""


def image_token_ids(hf_config, tokenizer) -> set[int]:
    """The ids of the tokens that stand for image content, as the model itself declares them:
    its config's `image_token_id` / `image_token_index`, else its processor's image token."""
    ids = set()
    for cfg in (hf_config, getattr(hf_config, "text_config", None)):
        for attr in ("image_token_id", "image_token_index"):
            value = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(value, int) and value >= 0:
                ids.add(value)
    if not ids:
        token = getattr(tokenizer, "image_token", None)
        if token:
            ids.add(tokenizer.convert_tokens_to_ids(token))
    return ids


class Engine:
    def __init__(self, model: str, options: dict[str, Any] | None = None, seed: int = 0):
        from vllm import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        options = options or {}
        self.model = model
        self.stall_timeout_s = float(options.get("stall_timeout_s", STALL_TIMEOUT_S))
        # Offline batch sizing, as `LLM` gets it: vLLM picks the scheduler's defaults by usage
        # context, and AsyncLLM's own falls back to 128 sequences / 2,048 tokens per step, where
        # `LLM` gets 256 / 4,096 on CPU and 1,024 / 16,384 on an H100 (vllm/engine/arg_utils.py).
        with engine_core_threads(options):
            self.llm = AsyncLLM.from_engine_args(
                AsyncEngineArgs(**engine_kwargs(model, options, seed)), usage_context=UsageContext.LLM_CLASS
            )
        scheduler = self.llm.vllm_config.scheduler_config
        # Twice what one engine step runs: a full step now, and a full queue for the next ones.
        self.window = SequenceWindow(int(options.get("max_sequences_in_flight", 2 * scheduler.max_num_seqs)))
        log.info(
            "engine: up to %d sequences, %d tokens per step; %d sequences in flight",
            scheduler.max_num_seqs,
            scheduler.max_num_batched_tokens,
            self.window.limit,
        )
        self.image_token_ids = image_token_ids(self.llm.model_config.hf_config, self.llm.get_tokenizer())
        self.add_bos: bool | None = None  # decided on the first render (see _render)

    @staticmethod
    def params(
        n: int,
        temperature: float,
        top_k: int,
        top_p: float,
        max_tokens: int,
        seed: int | None = None,
        **extra,
    ):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=n,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            max_tokens=max_tokens,
            seed=seed,
            output_kind=RequestOutputKind.FINAL_ONLY,
            **extra,
        )

    async def _render(self, conversation: list[dict], continue_final: bool):
        """The engine input for a conversation, as `LLM.chat` renders it (vLLM 0.32), plus the
        tokenizer's BOS where the chat template writes none (LLaVA-1.5): the sequence start the
        model was trained with, and the one the trainer uses (prompts.tokenizer_bos)."""
        if self.add_bos is None:
            from mmpr_pipeline.prompts import tokenizer_bos

            tokenizer = self.llm.get_tokenizer()
            probe = await self._render_with(
                [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
                False,
                add_special_tokens=False,
            )
            self.add_bos = bool(tokenizer_bos(tokenizer)) and list(probe["prompt_token_ids"][:1]) != [
                tokenizer.bos_token_id
            ]
        return await self._render_with(conversation, continue_final, add_special_tokens=self.add_bos)

    async def _render_with(self, conversation: list[dict], continue_final: bool, add_special_tokens: bool):
        from vllm.renderers import ChatParams

        renderer = self.llm.renderer
        chat_params = ChatParams(
            chat_template_kwargs=dict(
                add_generation_prompt=not continue_final,
                continue_final_message=continue_final,
                tools=None,
                tokenize=False,
            )
        )
        tok_params = renderer.default_chat_tok_params.with_kwargs(add_special_tokens=add_special_tokens)
        _, (engine_input,) = await renderer.render_chat_async([conversation], chat_params, tok_params)
        return engine_input

    async def chat(
        self, conversation: list[dict] | Callable[[], list[dict]], params, *, continue_final: bool = False
    ) -> Completion:
        """All samples of one conversation, once the sequence window admits them. `conversation` may
        be a function that builds it, called on admission (images are decoded only then). A request
        the engine refuses (say, a prompt longer than the context) fails alone, with its error
        recorded; a dead or stuck engine raises `EngineStalled`, so that the replica is restarted
        and the batch retried. The stall timeout starts on admission: waiting one's turn is not a stall."""
        async with self.window.take(params.n):
            return await self._chat(conversation, params, continue_final)

    async def _chat(self, conversation, params, continue_final: bool) -> Completion:
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            if callable(conversation):
                conversation = conversation()
            return await asyncio.wait_for(
                self._generate(conversation, params, continue_final), timeout=self.stall_timeout_s
            )
        except TimeoutError:
            raise EngineStalled(
                f"no result from the engine in {self.stall_timeout_s:.0f} s (engine.stall_timeout_s)"
            ) from None
        except EngineDeadError as e:
            raise EngineStalled(f"the engine process died: {e}") from None
        except Exception as e:  # noqa: BLE001 - vLLM raises several types for bad requests
            if self.llm.errored:
                raise EngineStalled(f"the engine process died: {type(e).__name__}: {e}") from None
            return Completion(error=f"{type(e).__name__}: {e}"[:500])

    async def _generate(self, conversation: list[dict], params, continue_final: bool) -> Completion:
        engine_input = await self._render(conversation, continue_final)
        final = None
        async for out in self.llm.generate(engine_input, params, request_id=uuid.uuid4().hex):
            final = out
        return Completion(
            texts=[o.text for o in final.outputs],
            n_tokens=[len(o.token_ids) for o in final.outputs],
            finish_reasons=[str(o.finish_reason) for o in final.outputs],
            prompt_token_ids=list(final.prompt_token_ids or []),
            logprobs=[o.cumulative_logprob for o in final.outputs],
        )

    def image_tokens(self, completion: Completion) -> int:
        """How many image placeholder tokens the prompt that was actually sent carried."""
        return sum(1 for t in completion.prompt_token_ids if t in self.image_token_ids)

    def shutdown(self) -> None:
        self.llm.shutdown()
        # vLLM leaves its ZMQ context to the garbage collector, whose `term` waits without end for
        # any socket still open: a test process hung there, inside an unrelated later test, after an
        # in-process engine. End it here, dropping what is unsent, and give up after a few seconds.
        ctx = getattr(getattr(getattr(self.llm, "engine_core", None), "resources", None), "ctx", None)
        if ctx is not None and not ctx.closed:
            ender = threading.Thread(target=ctx.destroy, kwargs=dict(linger=0), daemon=True)
            ender.start()
            ender.join(timeout=5)


def request_seed(seed: int, *parts: object) -> int:
    """A request's own seed, from the recipe seed and what identifies the request."""
    from mmpr_pipeline.records import stable_hash

    return int(stable_hash(seed, *parts), 16) % (2**31)
