"""RUN_DIR/preview.html: a page to look at a run's pairs and samples before training on them.

One self-contained file (images as small embedded thumbnails, inline CSS, no script: its
Content-Security-Policy forbids scripts and any network load). Per source it shows:

- `per_source` pairs sampled uniformly (reservoir sampling, seeded) from `data/`: the image, the
  question and reference answer, chosen and rejected side by side with the first point where they
  differ marked (for DropoutNTP: the cut point and the continuation written without the image),
  and, from `samples/`, what the judge extracted from each and why it ruled as it did;
- a few questions whose samples were all right, and all wrong, with every sample and its verdict
  (a judge that is too lenient or too strict shows up here);
- every reject reason of `rejects/` with its count and an example row.

Only what is shown is read: the shards are scanned once for their `source` column, then only the
chosen rows are taken, batch by batch; `samples/` units are scanned for a few small columns, then
only the units holding a shown question are read, without their images unless shown. The file is
at most `max_mb` (default MAX_MB) whatever the size of the run: each text is clipped around the
point that matters, and each source gets an equal share of the budget (cards that do not fit are
counted, not shown). Every text from the run is HTML-escaped: model output is untrusted.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any

from mmpr_pipeline.errors import PreviewError
from mmpr_pipeline.pairing import prefix_of
from mmpr_pipeline.preview_data import (
    pair_shards,
    read_json,
    read_rejects,
    read_rows_at,
    sample_pair_positions,
    scan_samples,
)
from mmpr_pipeline.records import WHITE, background_of, decode_image, plain_pixels
from mmpr_pipeline.run_status import finished_unit_files, partial_note, status
from mmpr_pipeline.storage import ObjectPath, as_path

PREVIEW_FILE = "preview.html"
MAX_MB = 8.0  # the file never exceeds this, whatever the run size
THUMB_PX = 192  # longest side of an embedded thumbnail
TEXT_CHARS = 2500  # characters of a response shown in a pair card (clipped around the difference)
SAMPLE_TEXT_CHARS = 1200  # characters of each sample shown for all-right / all-wrong questions
EXTREMES = 3  # all-right and all-wrong questions shown per source


def esc(value: Any) -> str:
    """HTML text of an untrusted value: `<`, `>`, `&` and quotes escaped (safe in text and attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


# --- pieces of the page ------------------------------------------------------------------------


def thumbnail(data: bytes | None, background=WHITE) -> str:
    """An <img> with the image as a small data: URI, or a note when the bytes are not an image. It shows
    the model's pixels (records.decode_image): the file itself only where a browser shows the same."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data or b""))
        img.load()
        fmt = (img.format or "").upper()
        small = max(img.size) <= THUMB_PX and len(data) <= 48_000
        if fmt in ("PNG", "JPEG", "GIF", "WEBP") and small and plain_pixels(data):
            mime, payload = f"image/{fmt.lower()}", data
        else:
            img = decode_image(data, background)
            img.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=80)
            mime, payload = "image/jpeg", buf.getvalue()
        w, h = img.size
    except Exception as e:  # noqa: BLE001 - any undecodable image becomes a note, not a broken page
        return f'<div class="noimg">image not shown: {esc(type(e).__name__)}</div>'
    return (
        f'<img class="thumb" alt="question image" width="{w}" height="{h}" '
        f'src="data:{mime};base64,{base64.b64encode(payload).decode()}">'
    )


def first_difference(a: str, b: str) -> int:
    """Index where `a` and `b` first differ, moved back to the start of that word."""
    n = 0
    limit = min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    while n > 0 and not a[n - 1].isspace():
        n -= 1
    return n


def clip(text: str, at: int, width: int) -> tuple[str, str, str, str]:
    """(note before, text before `at`, text from `at`, note after), at most `width` characters of
    text, kept around `at` so the marked point is always shown."""
    start = 0 if at <= width // 2 or len(text) <= width else min(at - width // 3, len(text) - width)
    end = min(len(text), start + width)
    before = f"[… {start:,} characters …] " if start else ""
    after = f" [… {len(text) - end:,} more characters]" if end < len(text) else ""
    at = min(max(at, start), end)
    return before, text[start:at], text[at:end], after


def marked_text(text: str, at: int, label: str, css: str, width: int = TEXT_CHARS) -> str:
    """The response with a marker at `at` and the rest highlighted."""
    before, head, tail, after = clip(text or "", at, width)
    parts = [
        f'<span class="clip">{esc(before)}</span>' if before else "",
        esc(head),
        f'<span class="mark" title="{esc(label)}" data-label="{esc(label)}"></span>',
        f'<span class="{css}">{esc(tail)}</span>',
        f'<span class="clip">{esc(after)}</span>' if after else "",
    ]
    return f'<div class="text">{"".join(parts)}</div>'


# No script, no network: the page may show only what it embeds.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def verdict_line(sample: dict | None, index: int | None) -> str:
    if index is not None and index < 0:  # pairing.REFERENCE: the source's reference rationale
        return (
            '<div class="verdict">the source\'s reference rationale (<code>fields.rationale</code>), '
            "not a sample</div>"
        )
    if sample is None or index is None or index >= len(sample.get("responses") or []):
        return '<div class="verdict muted">no sample row found for this response</div>'
    extracted = sample.get("extracted") or [None] * (index + 1)
    correct = sample.get("correct") or []
    reason = sample.get("reason") or []
    if not correct:  # dropout_ntp: no verdicts
        return f'<div class="verdict muted">sample #{index} (no answer to judge)</div>'
    got = extracted[index] if index < len(extracted) else None
    ok = correct[index] if index < len(correct) else None
    badge = '<span class="ok">right</span>' if ok else '<span class="bad">wrong</span>'
    return (
        f'<div class="verdict">sample #{index} · {badge} · extracted: '
        f"<code>{esc(got) if got is not None else '<i>nothing parsable</i>'}</code> · "
        f"judge: {esc(reason[index] if index < len(reason) else '')}{esc(decided_note(sample, index))}</div>"
    )


def decided_note(sample: dict, index: int) -> str:
    """' · decided by the judge model (yes p=0.98 | yes p=0.95)' where a judge model was asked."""
    decided_by = (sample.get("decided_by") or [""] * (index + 1))[index:][:1]
    replies = (sample.get("judge_replies") or [""] * (index + 1))[index:][:1]
    who = {"model": "the judge model", "rules": "the rules"}.get(decided_by[0] if decided_by else None, "")
    if not (replies and replies[0]):
        return ""
    return f" · decided by {who or 'nobody (undecided)'}; judge model replied {replies[0]}"


def _question_block(pair: dict, sample: dict | None) -> str:
    shown_question = (sample or {}).get("question") or pair.get("question") or ""
    answers = [a for a in (sample or {}).get("answers") or [] if a != pair.get("answer")]
    options = (sample or {}).get("options") or []
    rows = [f'<div class="q">{esc(shown_question)}</div>']
    if pair.get("answer"):
        rows.append(
            f'<div class="ref">reference answer: <b>{esc(pair["answer"])}</b>'
            + (f" (also accepted: {esc(', '.join(answers))})" if answers else "")
            + "</div>"
        )
    if options:
        rows.append(f'<div class="muted">options: {esc(" | ".join(options))}</div>')
    if pair.get("question") and pair.get("question") != shown_question:
        rows.append(
            f"<details><summary>prompt sent to the model ({esc(pair.get('prompt_template'))})</summary>"
            f'<div class="text">{esc(pair["question"][:TEXT_CHARS])}</div></details>'
        )
    return "".join(rows)


def pair_card(pair: dict, sample: dict | None) -> str:
    chosen, rejected = pair.get("chosen") or "", pair.get("rejected") or ""
    kind = pair.get("pair_type") or ""
    if kind == "dropout_ntp" and pair.get("prefix_words") is not None:
        at = len(prefix_of(chosen, int(pair["prefix_words"])))
        label_c = f"✂ cut after {pair['prefix_words']} words"
        label_r = "✂ continued without the image"
        css_c, css_r = "kept", "continued"
        title_c, title_r = "chosen: original response", "rejected: prefix + image-free continuation"
    else:
        at = first_difference(chosen, rejected)
        label_c = label_r = "▸ first difference"
        css_c, css_r = "diff-chosen", "diff-rejected"
        title_c, title_r = "chosen", "rejected" + (" (no parsable final answer)" if kind == "format" else "")
    images = "".join(
        thumbnail(im.get("bytes") if isinstance(im, dict) else im, background_of(pair.get("provenance")))
        for im in pair.get("images") or []
    )
    meta = " · ".join(
        esc(x) for x in (pair.get("task"), f"qid {pair.get('qid')}", f"pair {pair.get('id')}") if x
    )
    badge = f'<span class="badge {esc(kind)}">{esc(kind)}</span>'
    chosen_side = verdict_line(sample, pair.get("chosen_index"))
    chosen_side += marked_text(chosen, at, label_c, css_c)
    rejected_side = verdict_line(sample, pair.get("rejected_index"))
    rejected_side += marked_text(rejected, at, label_r, css_r)
    return f"""<article class="pair-card" data-pair-type="{esc(kind)}">
<div class="card-head">{badge} <span class="muted">{meta}</span></div>
<div class="pair-grid">
<div class="side-q">{images or '<div class="noimg">no image</div>'}{_question_block(pair, sample)}</div>
<div class="side chosen"><h4>{esc(title_c)}</h4>{chosen_side}</div>
<div class="side rejected"><h4>{esc(title_r)}</h4>{rejected_side}</div>
</div></article>"""


def question_card(sample: dict, kind: str) -> str:
    """A question whose samples were all right (or all wrong), with every sample and its verdict."""
    rows = []
    for i, text in enumerate(sample.get("responses") or []):
        got = (sample.get("extracted") or [None] * (i + 1))[i]
        ok = (sample.get("correct") or [False] * (i + 1))[i]
        reason = (sample.get("reason") or [""] * (i + 1))[i]
        before, head, tail, after = clip(text or "", 0, SAMPLE_TEXT_CHARS)
        rows.append(
            f"<tr><td>#{i}</td><td>{'<span class=ok>right</span>' if ok else '<span class=bad>wrong</span>'}"
            f"</td><td><code>{esc(got) if got is not None else '<i>nothing</i>'}</code></td>"
            f'<td>{esc(reason + decided_note(sample, i))}</td><td><div class="text small">{esc(head + tail)}'
            f'<span class="clip">{esc(after)}</span></div></td></tr>'
        )
    pair = dict(answer=sample.get("answer"), question="", prompt_template=sample.get("prompt_template"))
    badge = f'<span class="badge {"all-right" if kind == "all right" else "all-wrong"}">{esc(kind)}</span>'
    thumbnails = "".join(thumbnail(b) for b in sample.get("images") or [])
    return f"""<article class="question-card" data-kind="{esc(kind)}">
<div class="card-head">{badge}
<span class="muted">{esc(sample.get("task"))} · qid {esc(sample.get("qid"))}</span></div>
<div class="qgrid"><div class="side-q">{thumbnails}{_question_block(pair, sample)}</div>
<table class="samples"><tr><th></th><th>verdict</th><th>extracted</th><th>judge</th><th>response</th></tr>
{"".join(rows)}</table></div></article>"""


def _detail(reject: dict) -> str:
    """The example's own reason where the table's is its group (the benchmark row it matched)."""
    detail = reject.get("detail", reject["reason"])
    return f"{detail}: " if detail != reject["reason"] else ""


def decontamination_note(stats: dict) -> str:
    """A line per benchmark the sources were checked against: its rows and the source rows set aside."""
    checked = stats.get("decontamination") or {}
    items = [
        f"<li><code>{esc(name)}</code>: {b.get('rows', 0):,} benchmark rows; "
        f"{b.get('set_aside', 0):,} source rows set aside as its leaks</li>"
        for name, b in checked.items()
    ]
    return f"<h3>Evaluation sets checked for leaks</h3><ul>{''.join(items)}</ul>" if items else ""


def rejects_table(rejects: list[dict]) -> str:
    rows = "".join(
        f'<tr><td>{esc(r["reason"])}</td><td class="num">{r["count"]:,}</td>'
        f'<td class="num">{esc(r["row_index"])}</td>'
        f'<td><div class="text small">{esc(_detail(r))}{esc(r["row"])}</div></td></tr>'
        for r in rejects
    )
    return (
        '<table class="rejects"><tr><th>reason</th><th>rows</th><th>example row index</th>'
        f"<th>example row</th></tr>{rows}</table>"
    )


CSS = """
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1d1d1f;
 background:#f5f5f7;margin:0;padding:16px 24px}
main{max-width:1500px;margin:0 auto}
h1{font-size:24px;margin:4px 0 8px} h2{font-size:20px;margin:28px 0 8px;border-bottom:2px solid #ccc}
h3{font-size:16px;margin:18px 0 6px} h4{margin:0 0 4px;font-size:14px}
.muted{color:#666;font-size:13px} code{background:#eee;padding:0 3px;border-radius:3px}
.summary,.samples,.rejects{border-collapse:collapse;background:#fff;font-size:13px}
.summary td,.summary th,.samples td,.samples th,.rejects td,.rejects th{border:1px solid #ddd;padding:3px 6px;
 vertical-align:top;text-align:left}
.num{text-align:right}
article{background:#fff;border:1px solid #d7d7db;border-radius:8px;padding:10px 12px;margin:10px 0}
.card-head{margin-bottom:6px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;color:#fff;
 background:#777}
.badge.correctness{background:#4C72B0}.badge.format{background:#DD8452}.badge.dropout_ntp{background:#55A868}
.badge.all-right{background:#2e7d32}.badge.all-wrong{background:#c62828}
.pair-grid{display:grid;grid-template-columns:minmax(180px,230px) minmax(0,1fr) minmax(0,1fr);gap:12px}
.qgrid{display:grid;grid-template-columns:minmax(180px,230px) minmax(0,1fr);gap:12px}
.side{min-width:0}
.chosen h4{color:#2e7d32}.rejected h4{color:#c62828}
.thumb{display:block;max-width:100%;height:auto;border:1px solid #ccc;margin-bottom:6px;image-rendering:auto}
.noimg{padding:8px;border:1px dashed #aaa;color:#666;font-size:13px;margin-bottom:6px}
.q{white-space:pre-wrap;overflow-wrap:anywhere;font-weight:500;margin-bottom:4px}
.ref{font-size:14px;margin-bottom:4px;overflow-wrap:anywhere}
.verdict{font-size:13px;margin-bottom:4px;overflow-wrap:anywhere}
.ok{color:#2e7d32;font-weight:600}.bad{color:#c62828;font-weight:600}
.text{white-space:pre-wrap;overflow-wrap:anywhere;font:13.5px/1.45 ui-monospace,"DejaVu Sans Mono",monospace;
 background:#fafafa;border:1px solid #eee;padding:6px;border-radius:4px}
.text.small{font-size:12.5px;background:none;border:none;padding:0}
.mark::before{content:attr(data-label);font:600 11px system-ui,sans-serif;color:#fff;background:#8e24aa;
 border-radius:3px;padding:0 4px;margin:0 2px}
.diff-chosen,.kept{background:#e8f5e9}.diff-rejected,.continued{background:#ffebee}
.clip{color:#888;font-style:italic}
.samples{width:100%} .samples td:last-child{width:55%}
details summary{cursor:pointer;color:#555;font-size:13px}
nav a{margin-right:12px}
@media (max-width:900px){.pair-grid,.qgrid{grid-template-columns:minmax(0,1fr)}}
"""


def questions_and_rejects(extremes: dict, counts: dict, rejects: list[dict], budget: int) -> list[str]:
    """A source's all-right and all-wrong questions, then its reject reasons, within `budget` bytes."""
    extra, used = [], 0
    for kind in ("all right", "all wrong"):
        rows = extremes.get(kind) or []
        if not rows:
            continue
        extra.append(f"<h3>Questions answered {esc(kind)} ({counts.get(kind, 0):,} in all; no pairs)</h3>")
        for row in rows:
            card = question_card(row, kind)
            if used + len(card.encode()) > budget:
                extra.append('<p class="muted">more not shown, to keep this file small</p>')
                break
            extra.append(card)
            used += len(card.encode())
    if rejects:
        table = rejects_table(rejects)
        if used + len(table.encode()) <= budget:
            extra.append(f"<h3>Rejected source rows ({sum(r['count'] for r in rejects):,})</h3>{table}")
    return extra


def source_section(
    run_dir: Path,
    name: str,
    anchor: str,
    pairs: list[dict],
    total: int,
    stats: dict,
    seed: int,
    budget: int,
    max_mb: float,
) -> tuple[str, int, str]:
    """One source's part of the page within `budget` bytes: its pair cards (four fifths of the
    budget at most), its all-right / all-wrong questions and its rejects; returns (the section,
    pairs shown, its row of the summary table)."""
    samples, extremes = scan_samples(run_dir, name, {p["qid"] for p in pairs}, EXTREMES, seed)
    rejects = read_rejects(run_dir, name)
    cards, used = [], 0
    for pair in pairs:
        card = pair_card(pair, samples.get(pair["qid"]))
        if used + len(card.encode()) > budget * 0.8:  # keep a fifth for questions and rejects
            break
        cards.append(card)
        used += len(card.encode())
    note = f"{len(cards)} of {total:,} pairs, picked uniformly at random (seed {seed})" + (
        f"; {len(pairs) - len(cards)} more picked but not shown, to keep this file under {max_mb:g} MB"
        if len(cards) < len(pairs)
        else ""
    )
    section = [f'<section class="source" id="{anchor}"><h2>{esc(name)}</h2>']
    section.append(f'<h3>Pairs</h3><p class="muted">{esc(note)}</p>{"".join(cards)}')
    counts = extremes.pop("counts")
    section += questions_and_rejects(extremes, counts, rejects, budget - used) + ["</section>"]
    st = (stats.get("sources") or {}).get(name, {})
    row = (
        f'<tr><td><a href="#{anchor}">{esc(name)}</a></td><td>{esc(st.get("pipeline", ""))}</td>'
        f'<td class="num">{esc(st.get("questions", ""))}</td><td class="num">{total:,}</td>'
        f'<td class="num">{len(cards)}</td><td class="num">{counts.get("all right", 0):,}</td>'
        f'<td class="num">{counts.get("all wrong", 0):,}</td>'
        f'<td class="num">{sum(r["count"] for r in rejects):,}</td>{verdict_cells(st)}</tr>'
    )
    return "".join(section), len(cards), row


def render(run_dir: Path, per_source: int = 20, seed: int = 0, max_mb: float = MAX_MB) -> str:
    """The preview page of a run folder, as text (see the module docstring)."""
    stats = read_json(run_dir / "stats.json")
    run_status = status(run_dir)
    # A stopped build's data/ is missing or from before: its finished units' pairs are what it has.
    shards = pair_shards(run_dir) if _whole(run_status) else finished_unit_files(run_dir, "pairs")
    positions, pair_counts = sample_pair_positions(shards, per_source, seed)
    names = list((stats.get("sources") or {}).keys())
    found = (
        set(pair_counts)
        | {p.name for p in (run_dir / "samples").glob("*") if p.is_dir()}
        | {p.stem for p in (run_dir / "rejects").glob("*.parquet")}
    )
    names += sorted(found - set(names))
    # An equal share per source, after the page's frame and each source's heading and summary row.
    budget = int((max_mb * 2**20 - 16_384) / max(1, len(names))) - 2_048
    shown_total, sections, nav, summary = 0, [], [], []
    for name in names:
        anchor = "src-" + re.sub(r"[^A-Za-z0-9_-]", "_", name)
        picked = positions.get(name, [])
        rows_at = read_rows_at(shards, picked)
        pairs = [rows_at[p] for p in picked if p in rows_at]
        total = pair_counts.get(name, 0)
        section, shown, row = source_section(run_dir, name, anchor, pairs, total, stats, seed, budget, max_mb)
        shown_total += shown
        sections.append(section)
        nav.append(f'<a href="#{anchor}">{esc(name)}</a>')
        summary.append(row)
    title = f"MMPR preview: {stats.get('recipe') or run_dir.name}"
    head = (
        f'<h1>{esc(title)}</h1><p class="muted">model <code>{esc(stats.get("model", "?"))}</code> · '
        f"built {esc(stats.get('created', '?'))} · {shown_total} pairs shown · at most {per_source} per "
        f"source, seed {seed} · this file is capped at {max_mb:g} MB</p>"
        + ("" if _whole(run_status) else f'<p class="muted">{esc(partial_note(run_status))}</p>')
        + f"<nav>{''.join(nav)}</nav>"
        '<table class="summary"><tr><th>source</th><th>pipeline</th><th>questions</th><th>pairs</th>'
        "<th>shown</th><th>all right</th><th>all wrong</th><th>rejected rows</th>"
        "<th>verdicts by rules / judge model / undecided</th><th>judge agrees with rules</th></tr>"
        f"{''.join(summary)}</table>{decontamination_note(stats)}"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{CSS}</style></head>
<body><main>{head}{"".join(sections)}</main></body></html>
"""


def verdict_cells(st: dict) -> str:
    """The summary's "who decided" cells of a source (stats.json's verdicts and judge_model)."""
    v, judged = st.get("verdicts") or {}, st.get("judge_model") or {}
    if not v or st.get("pipeline") == "dropout_ntp":
        return "<td></td><td></td>"
    both = judged.get("both_decided", 0)
    agree = f"{judged.get('agree', 0) / both:.0%} of {both:,}" if both else "–"
    return (
        f'<td class="num">{v.get("rules", 0):,} / {v.get("model", 0):,} / {v.get("undecided", 0):,}</td>'
        f'<td class="num">{agree}</td>'
    )


def _whole(run_status) -> bool:
    """Whether the page reads data/'s shards: a finished run, or a dataset folder with shards and no
    samples/ (a published dataset downloaded from the Hub), which no build is writing."""
    return run_status.finished or not (run_status.run_dir / "samples").is_dir()


def write_preview(run_dir: str | Path, per_source: int = 20, seed: int = 0, max_mb: float = MAX_MB) -> Path:
    """Write RUN_DIR/preview.html (atomically) and return its path."""
    run_dir = as_path(run_dir)
    if not run_dir.is_dir():
        raise PreviewError(f"{run_dir}: no such run folder")
    if per_source < 0:
        raise PreviewError(f"--per-source must be >= 0, got {per_source}")
    if not pair_shards(run_dir) and not (run_dir / "samples").is_dir():
        raise PreviewError(f"{run_dir}: neither data/ shards nor samples/ found (is this a run folder?)")
    run_status = status(run_dir)
    if not _whole(run_status):  # the page shows the finished units, and says so
        print(partial_note(run_status), file=sys.stderr)
    path = run_dir / PREVIEW_FILE
    if isinstance(path, ObjectPath):  # an object appears whole when written
        path.write_bytes(render(run_dir, per_source, seed, max_mb).encode("utf-8"))
        return path
    tmp = path.with_name(f".{PREVIEW_FILE}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(render(run_dir, per_source, seed, max_mb).encode("utf-8"))
    os.replace(tmp, path)  # a reader never sees half a page
    return path
