"""Preference pairs in, padded token batches out.

A pair row (records.PAIR_SCHEMA, or a Hub dataset with the same columns) has `images` (a list of
`datasets` Image structs, possibly empty), `question` (the whole user turn, as it was sent to the
model), `chosen` and `rejected`. Its prompt is a chat with one user message, [image parts..., text
part], rendered by the model's own chat template and processor; each response is the assistant
turn up to and including the template's end-of-turn token. Only response tokens are scored.

Nothing is ever truncated (cutting image tokens would break the model's input): a pair longer than
`max_length` is dropped, and the trainer counts and reports it.
"""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mmpr_pipeline import storage
from mmpr_pipeline.prompts import tokenizer_bos, user_content
from mmpr_pipeline.records import WHITE, background_of, decode_image, encode_image, stable_hash

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("question", "chosen", "rejected")
OPTIONAL_COLUMNS = ("id", "qid", "images", "pair_type", "provenance")  # provenance: image_background
# Processor outputs with one value per token: padded and extended over the response. Everything
# else (pixel_values, image_grid_thw, image_sizes, ...) is per image and concatenated along dim 0.
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


# --- loading ---------------------------------------------------------------------------------------


def parquet_files(source: str | Path) -> list[Path] | None:
    """The Parquet files `source` names (a run folder, its data/ folder, a file or a glob, local or
    s3://); None if it names no local path (then it is taken as a Hub dataset id)."""
    p = storage.as_path(source)
    if isinstance(p, storage.ObjectPath) and storage.has_glob(p.url):
        return [storage.as_path(u) for u in storage.expand(p.url)]
    if p.is_dir():
        folder = p / "data" if (p / "data").is_dir() else p
        files = sorted(folder.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(
                f"no .parquet files in {folder} (build pairs first, e.g. `make build-mmpr`)"
            )
        return files
    if p.is_file():
        return [p]
    if any(ch in str(source) for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(source)))
        if not files:
            raise FileNotFoundError(f"no files match {source}")
        return files
    if (
        str(source).startswith((".", "/", "~"))
        or str(source).endswith(".parquet")
        or str(source).count("/") != 1
    ):
        raise FileNotFoundError(
            f"no such file or folder: {source} (build pairs first, e.g. `make build-mmpr`)"
        )
    return None


def load_pairs(source: str | Path) -> pa.Table:
    """All pairs of `source` as one Arrow table, with only the columns training reads.

    `source` is a run folder, its `data/` folder, a Parquet file or glob, or a Hub dataset id
    (`user/name`, optionally `user/name:split`; default split `train`). Local Parquet is read into
    memory, image bytes included (images are decoded only per batch); a Hub dataset stays in
    `datasets`' memory-mapped cache, the way to train on more pairs than fit in memory.
    """
    files = parquet_files(source)
    if files is not None:
        tables = []
        for f in files:
            try:
                schema = pq.read_schema(storage.parquet_source(f))
                cols = [c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c in schema.names]
                tables.append(pq.read_table(storage.parquet_source(f), columns=cols))
            except (pa.ArrowException, OSError) as e:  # pyarrow's messages do not name the file
                raise ValueError(f"{f}: not a readable Parquet file ({e})") from None
        names = set(tables[0].column_names)
        for f, t in zip(files, tables):
            if set(t.column_names) != names:
                raise ValueError(
                    f"{f}: columns {sorted(t.column_names)} differ from {files[0]}'s {sorted(names)}"
                )
        table = pa.concat_tables(tables)
        where = str(files[0].parent)
    else:
        import datasets

        repo, _, split = str(source).partition(":")
        try:
            ds = datasets.load_dataset(repo, split=split or "train")
        except Exception as e:  # offline, unknown repo, ...: say what was tried
            raise FileNotFoundError(
                f"{source} is no local path, and loading it as a Hub dataset failed: {e}"
            ) from e
        keep = [c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c in ds.column_names]
        table = ds.select_columns(keep).with_format("arrow")[:]
        where = str(source)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{where}: missing column(s) {missing}; pairs need {list(REQUIRED_COLUMNS)} "
            "and optionally images (see records.PAIR_SCHEMA)"
        )
    for c in REQUIRED_COLUMNS:
        nulls = table[c].null_count
        if nulls:
            raise ValueError(f"{where}: column {c!r} has {nulls} null value(s); every pair needs a {c}")
    return table


# --- pairs training cannot use ---------------------------------------------------------------------

SET_ASIDE_REASONS = ("empty", "chosen equals rejected", "image cannot be decoded")


def _same_text(a: str, b: str) -> bool:
    """Equal apart from white space: no preference to learn (the reward margin is 0 by construction)."""
    return a.split() == b.split()


def pair_problem(row: dict, with_rejected: bool, decoded: dict[bytes, str | None]) -> tuple[str, str] | None:
    """(reason, detail) when training cannot use `row`, else None. `decoded` caches each image's
    decode error (None: fine), so the pairs of one question decode their image once."""
    for column in ("question", "chosen") + (("rejected",) if with_rejected else ()):
        if not (row.get(column) or "").strip():
            return "empty", f"{column} is empty"
    if with_rejected and _same_text(row["chosen"], row["rejected"]):
        return "chosen equals rejected", "chosen and rejected are the same text (white space aside)"
    for k, image in enumerate(row.get("images") or []):
        try:
            data = encode_image(image)
        except (OSError, ValueError) as e:
            return "image cannot be decoded", f"image {k}: {e}"
        if data not in decoded:
            try:
                decode_image(data)
                decoded[data] = None
            except Exception as e:  # noqa: BLE001 - PIL raises many types for a broken file
                decoded[data] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        if decoded[data] is not None:
            return "image cannot be decoded", f"image {k}: {decoded[data]}"
    return None


def set_aside_bad_pairs(table: pa.Table, with_rejected: bool = True) -> tuple[pa.Table, list[dict]]:
    """The pairs training can use, and the others as rejects ({row, id, reason, detail}), as a build
    sets aside bad source rows: an empty question or response, a chosen equal to its rejected, an
    image that cannot be decoded. Checked before training starts, so one bad pair never stops a run
    part-way. Reads the table in batches; each distinct image is decoded once."""
    keep, rejects, decoded = [], [], {}
    columns = [c for c in ("id", "question", "chosen", "rejected", "images") if c in table.column_names]
    start = 0
    for batch in table.select(columns).to_batches(max_chunksize=1024):
        for i, row in enumerate(batch.to_pylist(), start):
            problem = pair_problem(row, with_rejected, decoded)
            keep.append(problem is None)
            if problem is not None:
                rejects.append(dict(row=i, id=row.get("id"), reason=problem[0], detail=problem[1]))
        start += batch.num_rows
    return (table.filter(pa.array(keep, pa.bool_())) if rejects else table), rejects


def split_pairs(table: pa.Table, eval_fraction: float, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """Hold out about `eval_fraction` of the questions (all pairs of a question fall on one side,
    so the held-out reward accuracy is measured on questions never trained on)."""
    if eval_fraction <= 0 or table.num_rows == 0:
        return table, table.slice(0, 0)
    # Without a qid column (a foreign dataset), pairs with the same question text go together.
    keys = table["qid" if "qid" in table.column_names else "question"].to_pylist()
    bucket = [int(stable_hash("split", seed, k, length=8), 16) / 16**8 < eval_fraction for k in keys]
    mask = pa.array(bucket)
    held_out = table.filter(mask)
    if held_out.num_rows == 0:  # tiny data: hold out at least one question's pairs
        first = keys[0]
        mask = pa.array([k == first for k in keys])
        held_out = table.filter(mask)
    return table.filter(pc.invert(mask)), held_out


def select(table: pa.Table, pair_types: list[str] | None = None, limit: int | None = None) -> pa.Table:
    if pair_types is not None:
        if "pair_type" not in table.column_names:
            raise ValueError("pair_types is set but the data has no pair_type column")
        table = table.filter(pc.is_in(table["pair_type"], value_set=pa.array(pair_types)))
    if limit is not None:
        table = table.slice(0, limit)
    return table


# --- encoding --------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """One pair, tokenized: the prompt once, then each response."""

    index: int
    prompt: dict[str, torch.Tensor]  # processor output for the prompt (batch of 1)
    chosen_ids: list[int]
    rejected_ids: list[int] = field(default_factory=list)

    @property
    def prompt_len(self) -> int:
        return self.prompt["input_ids"].shape[1]


@dataclass
class Dropped:
    """A pair too long for max_length: counted and reported, never cut."""

    index: int
    pair_id: str
    length: int


def _image_list(value: Any, background=WHITE) -> list:
    """A pair's images as the sampler saw them (records.decode_image), over the pair's background."""
    if value is None:
        return []
    return [decode_image(encode_image(img), background) for img in value]


def turn_end_ids(tokenizer) -> set[int]:
    """Tokens that end an assistant turn: EOS and the special tokens a template ends turns with
    (`<|im_end|>`, `<end_of_turn>`, `<end_of_utterance>`)."""
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return special | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


class PairEncoder:
    """Renders and tokenizes pairs with the model's own chat template and processor.

    The sequence starts as the model's own convention has it: the template's BOS if it writes one
    (Gemma), else the BOS its tokenizer adds (LLaVA-1.5's template writes none; its Llama tokenizer
    adds `<s>`). A response whose turn the template does not close with an end token (LLaVA-1.5)
    gets EOS appended, as TRL does for plain text, or the SFT term never teaches the model to stop.
    """

    def __init__(self, processor, max_length: int, with_rejected: bool = True):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
        self.with_rejected = with_rejected
        self.bos = tokenizer_bos(self.tokenizer)
        self.turn_end = turn_end_ids(self.tokenizer)

    def prompt_messages(self, question: str, n_images: int) -> list[dict]:
        # the same layout as sampling (prompts.user_content): at `<image>` placeholders, else first
        content = user_content(question, [None] * n_images, lambda _: {"type": "image"})
        return [{"role": "user", "content": content}]

    def response_text(self, messages: list[dict], prompt_text: str, response: str) -> str:
        """The assistant turn as the template writes it after the prompt, ending with its end-of-turn
        token (trailing whitespace after that token belongs to no turn and is left out)."""
        full = self.processor.apply_chat_template(
            messages + [{"role": "assistant", "content": [{"type": "text", "text": response}]}],
            tokenize=False,
        )
        if not full.startswith(prompt_text):
            raise ValueError(
                "the chat template renders the user turn differently when an assistant turn follows; "
                "cannot find where the response starts"
            )
        suffix = full[len(prompt_text) :]
        end = suffix.rfind(response) + len(response) if response and response in suffix else 0
        return suffix[:end] + suffix[end:].rstrip()

    def encode(self, row: dict, index: int) -> Encoded | Dropped:
        images = _image_list(row.get("images"), background_of(row.get("provenance")))
        messages = self.prompt_messages(row["question"], len(images))
        prompt_text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # add_special_tokens=False: BOS is written once, by the template or here.
        bos = self.bos if self.bos and not prompt_text.startswith(self.bos) else ""
        prompt = self.processor(
            text=[bos + prompt_text], images=images or None, return_tensors="pt", add_special_tokens=False
        )
        prompt = {k: v for k, v in prompt.items() if isinstance(v, torch.Tensor)}
        responses = [row["chosen"]] + ([row["rejected"]] if self.with_rejected else [])
        ids = [
            self.tokenizer(self.response_text(messages, prompt_text, r), add_special_tokens=False)[
                "input_ids"
            ]
            for r in responses
        ]
        eos = self.tokenizer.eos_token_id
        ids = [i + [eos] if eos is not None and (not i or i[-1] not in self.turn_end) else i for i in ids]
        length = prompt["input_ids"].shape[1] + max(len(i) for i in ids)
        if length > self.max_length:
            return Dropped(index, str(row.get("id") or index), length)
        return Encoded(index, prompt, ids[0], ids[1] if self.with_rejected else [])


class PairError(ValueError):
    """A pair that could not be encoded during training; the message names it."""


class PairDataset(torch.utils.data.Dataset):
    """Pairs of an Arrow table, encoded on access (images are decoded only when a batch needs them)."""

    def __init__(self, table: pa.Table, encoder: PairEncoder):
        self.table = table
        self.encoder = encoder

    def __len__(self) -> int:
        return self.table.num_rows

    def row(self, i: int) -> dict:
        return self.table.slice(i, 1).to_pylist()[0]

    def ids(self) -> list[str]:
        if "id" in self.table.column_names:
            return [str(x) for x in self.table["id"].to_pylist()]
        return [
            stable_hash(q, c, r)
            for q, c, r in zip(
                self.table["question"].to_pylist(),
                self.table["chosen"].to_pylist(),
                self.table["rejected"].to_pylist(),
            )
        ]

    def __getitem__(self, i: int) -> Encoded | Dropped:
        row = self.row(i)
        try:
            return self.encoder.encode(row, i)
        except Exception as e:  # noqa: BLE001 - say which pair, whatever the processor raised
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise PairError(f"pair {row.get('id') or i} (row {i}): {type(e).__name__}: {first}") from e


# --- batching --------------------------------------------------------------------------------------


def collate(items: list[Encoded | Dropped], pad_token_id: int) -> dict[str, Any]:
    """Pad a micro-batch of pairs into one batch of sequences: all chosen first, then all rejected
    (when encoded). `response_mask` marks the tokens that are scored. Dropped pairs are passed on
    (`dropped`) so the trainer can count them."""
    pairs = [x for x in items if isinstance(x, Encoded)]
    batch: dict[str, Any] = {"dropped": [x for x in items if isinstance(x, Dropped)], "n_pairs": len(pairs)}
    if not pairs:
        return batch
    with_rejected = bool(pairs[0].rejected_ids)
    seqs = [(p, p.chosen_ids) for p in pairs] + (
        [(p, p.rejected_ids) for p in pairs] if with_rejected else []
    )
    width = max(p.prompt_len + len(r) for p, r in seqs)
    n = len(seqs)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    response_mask = torch.zeros((n, width), dtype=torch.bool)
    keys = list(dict.fromkeys(k for p in pairs for k in p.prompt))  # rows without images lack pixel keys
    extra = {
        k: torch.zeros((n, width), dtype=next(p.prompt[k].dtype for p in pairs if k in p.prompt))
        for k in TOKEN_KEYS[2:]
        if k in keys
    }
    for i, (p, resp) in enumerate(seqs):
        lp, lr = p.prompt_len, len(resp)
        input_ids[i, :lp] = p.prompt["input_ids"][0]
        input_ids[i, lp : lp + lr] = torch.tensor(resp, dtype=torch.long)
        attention_mask[i, : lp + lr] = 1
        response_mask[i, lp : lp + lr] = True
        for k, t in extra.items():
            if k in p.prompt:
                t[i, :lp] = p.prompt[k][0]
    batch.update(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask, **extra)
    # Per-image tensors, in sequence order: chosen rows' images, then the same images again for rejected.
    for k in keys:
        if k in TOKEN_KEYS:
            continue
        per_seq = [p.prompt[k] for p, _ in seqs if k in p.prompt and p.prompt[k].numel()]
        if per_seq:
            batch[k] = torch.cat(per_seq, dim=0)
    batch["index"] = torch.tensor([p.index for p in pairs], dtype=torch.long)
    return batch


MODEL_INPUT_SKIP = ("dropped", "n_pairs", "response_mask", "index")


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k not in MODEL_INPUT_SKIP}
