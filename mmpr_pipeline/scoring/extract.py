"""Find the final answer in a model response, and strip its dress (Markdown, LaTeX wrappers).

Where the answer is looked for, in this order (after the last `</think>` of an R1-style
response; a `<think>` block that never closes holds no answer):
1. the last `Final answer:` / `Final Answer:` / `Answer:` marker (also `**Final Answer**: `,
   `### Final Answer`, `The final answer is`, Chinese `最终答案：` / `答案：`): the rest of its
   line, or the next non-empty line when the marker ends its line; a display block (`\\[` ...
   `\\]`, `$$` ... `$$`) opened there runs to its closing line; a `\\boxed{...}` inside it is
   unwrapped;
2. else the last `\\boxed{...}` (nested braces allowed);
3. else the last "the answer is ..." / "the correct option is ..." / `答案是` phrase;
4. else a terse response (one short line, e.g. LLaVA's "B" or "Yes") is its own answer.
Nothing found gives None with reason "no final answer". When a boxed answer and a marker answer
both exist and are different texts, both are returned, so the judge can refuse a response that
names two different final answers.

Besides the cleaned answer, `segment` keeps the raw text it came from (the marker's line; the
line of the last box, with every box on it): maths hands it to math-verify's own extraction,
which finds the expression inside a sentence ("The largest $n$ is 34.") and joins several boxes.
A response with none of the four gives the maths judge its last line as `segment` when that line
holds inline maths ("Therefore $x \\geq 5$ is the solution."); `answer` stays None.

`format_ok` follows the paper's format rules: a non-empty rationale, then the final-answer line
(marker or box), and nothing after it (Minerva's "I hope it is correct." aside). It is reported,
not used to judge correctness.

Only the last `TAIL_CHARS` characters are searched and all patterns are linear, so a response of
any length costs at most a few tens of microseconds here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TAIL_CHARS = 4000  # the final answer is at the end; a 200 000-character response costs nothing
MAX_ANSWER_CHARS = 1000  # longer "answers" are refused ("answer too long")
TERSE_CHARS = 200  # a marker-less response this short, on one line, is its own answer
NO_ANSWER = "no final answer"
TOO_LONG = "answer too long"

# `Final answer` followed by a colon, "is", "=" or the end of its line, with Markdown around it.
_FINAL_MARKER = re.compile(
    r"(?i)(?:\bfinal[ \t]+answer|最终答案|最后答案)(?:[ \t]*[*_#]+)?[ \t]*"
    r"(?:[:：=]|is\b|[是为][:：]?|(?=[ \t]*$))",
    re.MULTILINE,
)
# `Answer:` at the start of a line (after Markdown such as `**`, `#`, `>`, `-`).
_LINE_MARKER = re.compile(r"(?im)^[ \t>#*_-]*(?:answer|答案)(?:[ \t]*[*_]+)?[ \t]*[:：]")
# "the answer is B", "the correct option is (B)", "so the answer would be 3", "答案是 3"
_PHRASE_MARKER = re.compile(
    r"(?i)\b(?:correct|right|best|final)?[ \t]*(?:answer|option|choice)[ \t]+"
    r"(?:is|would[ \t]+be|should[ \t]+be|will[ \t]+be)\b[ \t]*:?"
    r"|答案(?:应该|应)?[是为][:：]?"
)
_BOXED = re.compile(r"\\(?:boxed|fbox)[ \t]*\{")
_BRACE = re.compile(r"\\[{}]|[{}]")  # \{ and \} are set braces, not groups
_LEADING_PHRASE = re.compile(
    r"(?i)^(?:(?:so|thus|therefore|hence)[ ,]+)?(?:the[ \t]+)?(?:final[ \t]+|correct[ \t]+)?"
    r"answer[ \t]*(?:is|:)[ \t]*:?[ \t]*"
)
# Minerva's closing sentence (also Qwen's maths prompt's): "... is $28\%$. I hope it is correct."
_COURTESY = re.compile(r"(?is)[ \t.]*\bI[ \t]+hope[ \t]+(?:it|this|that)[ \t]+is[ \t]+correct\b.*$")
_TEXT_WRAPPER = re.compile(
    r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|emph|mbox|operatorname)"
    r"[ \t]*\{([^{}]*)\}"
)
_MATH_DELIMITERS = re.compile(r"\$\$|\\\(|\\\)|\\\[|\\\]")
_EMPHASIS = re.compile(r"\*\*|__|`+|~~")
_TRAILING = re.compile(r"(?:[\s.,;:?。，；：]|(?<![0-9})\]])!)+$")  # "5!" keeps its factorial
_DELIMITER_LINE = re.compile(r"^[\s$\\\[\]()*_#>-]*$")  # "$$", "\[", "**" ...: not an answer
_BOX_JOIN = re.compile(
    r"(?:[\s,;$()\[\].]|\\[()\[\]]|\\q?quad\b|\\[,;: ]|\\text[ \t]*\{[ \t]*(?:and|or|,)?[ \t]*\}"
    r"|\b(?:and|or)\b|\b[A-Za-z][ \t]*=)*"
)
_DISPLAY_OPEN = re.compile(r"\\\[|\$\$")
_THINK_OPEN = re.compile(r"(?i)<think>")
_THINK_CLOSE = re.compile(r"(?i)</think>")
_INLINE_MATH = re.compile(r"\$[^$\n]+\$|\\\(.+?\\\)")


@dataclass(frozen=True, slots=True)
class Extraction:
    answer: str | None  # the primary final answer, cleaned; None when none was found
    others: tuple[str, ...]  # other final answers the response names (a conflicting box)
    source: str  # "marker" | "boxed" | "phrase" | "terse" | "none"
    format_ok: bool
    reason: str = ""  # why answer is None: "no final answer" | "answer too long"
    segment: str = ""  # the raw text the answer came from (see the module docstring)


def last_boxed(text: str) -> tuple[str, int, int] | None:
    """Content, start and end of the last `\\boxed{...}` in `text` whose braces balance; None if
    none. One pass with a stack, so even thousands of unclosed boxes cost linear time."""
    opens = {m.end() - 1: m.start() for m in _BOXED.finditer(text)}
    if not opens:
        return None
    stack, best = [], None
    for m in _BRACE.finditer(text, min(opens)):
        ch = m.group()
        if ch == "{":
            stack.append(m.start())
        elif ch == "}" and stack:
            left = stack.pop()
            if left in opens and (best is None or opens[left] > best[1]):
                best = (text[left + 1 : m.start()], opens[left], m.end())
    return best


def all_boxed(text: str) -> list[tuple[str, int, int]]:
    """Every outermost balanced `\\boxed{...}` in `text`, in order: (content, start, end)."""
    opens = {m.end() - 1: m.start() for m in _BOXED.finditer(text)}
    if not opens:
        return []
    stack, found = [], []
    for m in _BRACE.finditer(text, min(opens)):
        if m.group() == "{":
            stack.append(m.start())
        elif m.group() == "}" and stack:
            left = stack.pop()
            if left in opens:
                found.append((text[left + 1 : m.start()], opens[left], m.end()))
    found.sort(key=lambda box: box[1])
    outermost, reach = [], -1
    for box in found:
        if box[1] >= reach:
            outermost.append(box)
            reach = box[2]
    return outermost


def boxed_group(text: str) -> list[str]:
    """The contents of the last box in `text` and of the boxes joined to it by "and", "or", "," or
    `x =` ("\\boxed{(2,2)} \\text{and} \\boxed{(6,2)}", "$x = \\boxed{3}$ or $x = \\boxed{4}$"), each
    once, in order. A box followed by other words ("\\boxed{5}... wait, \\boxed{6}") is corrected
    by the last one and left out."""
    boxes = all_boxed(text)
    if not boxes:
        return []
    group = [boxes[-1]]
    for box in reversed(boxes[:-1]):
        if not _BOX_JOIN.fullmatch(text[box[2] : group[0][1]]):
            break
        group.insert(0, box)
    return list(dict.fromkeys(box[0].strip() for box in group))


def unbox(text: str) -> str | None:
    """The content of the box(es) in `text` (see boxed_group); several different ones are joined
    as a hedge, "3 or 4", for single-answer types (maths reads them as a set instead); None: no box."""
    contents = boxed_group(text)
    return " or ".join(contents) if contents else None


def clean(answer: str) -> str:
    """Strip an answer's dress: box, math delimiters, \\text{}, Markdown, leading phrases, end dots."""
    s = _COURTESY.sub("", answer).strip()
    boxed = unbox(s)
    if boxed is not None:
        s = boxed
    for _ in range(3):  # \text{\textbf{B}} needs two passes
        s, n = _TEXT_WRAPPER.subn(r"\1", s)
        if not n:
            break
    s = _MATH_DELIMITERS.sub("", s)
    if s.count("$") >= 2:  # $...$ math; a single $ is a currency sign
        s = s.replace("\\$", "\0").replace("$", "").replace("\0", "\\$")
    s = _EMPHASIS.sub("", s).strip()
    s = _LEADING_PHRASE.sub("", s)
    s = s.strip().strip("*_#").strip()
    s = _TRAILING.sub("", re.sub(r"[ \t]+", " ", s))
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
        s = s[1:-1].strip()
    return s


def _line_end(text: str, pos: int) -> int:
    end = text.find("\n", pos)
    return len(text) if end < 0 else end


def _line_after(text: str, pos: int) -> tuple[str, int]:
    """The rest of the line at `pos`, or the next line that is not just delimiters; and its end.
    A display block (`\\[`, `$$`) opened there and closed on a later line is taken whole."""
    start, end = pos, _line_end(text, pos)
    while _DELIMITER_LINE.match(text[start:end]) and end < len(text):
        start, end = end + 1, _line_end(text, end + 1)
    line = text[start:end]
    box = _BOXED.search(line)
    if box is not None and not any(b[1] == box.start() for b in all_boxed(line)):
        closing = [b for b in all_boxed(text[start : start + MAX_ANSWER_CHARS]) if b[1] == box.start()]
        if closing:  # "\\boxed{" newline "\\begin{pmatrix}..." newline "}"
            end = _line_end(text, start + closing[0][2])
            return " ".join(text[start:end].split()), end
    opener = _DISPLAY_OPEN.search(text, pos, end)
    if opener is not None:
        closer = "\\]" if opener.group() == "\\[" else "$$"
        if closer not in text[opener.end() : end]:
            close = text.find(closer, end)
            if 0 <= close - end <= MAX_ANSWER_CHARS:
                end = _line_end(text, close)
                line = " ".join(text[start:end].split())
    return line, end


def _has_rationale(text: str, pos: int, tail_start: int) -> bool:
    """Is there reasoning before `pos`? (A cut-off tail always had some.)"""
    return tail_start > 0 or bool(text[:pos].strip(" \t\n*_#>-:$\\[]"))


def _only_delimiters(text: str) -> bool:
    """Nothing but blank lines, closing delimiters ("$$", "\\]") and Minerva's "I hope it is
    correct." after the answer line?"""
    return all(_DELIMITER_LINE.match(_COURTESY.sub("", line)) for line in text.split("\n"))


def _last(pattern: re.Pattern, text: str) -> re.Match | None:
    match = None
    for match in pattern.finditer(text):  # noqa: B007 - the loop keeps the last match
        pass
    return match


def after_thinking(response: str) -> str | None:
    """The part of an R1-style response after its last `</think>`; None when a `<think>` block
    never closes (the model ran out of tokens while thinking: no answer yet)."""
    close = _last(_THINK_CLOSE, response)
    if close is not None:
        return response[close.end() :]
    if _THINK_OPEN.search(response):
        return None
    return response


def _unmarked(text: str, tail_start: int) -> tuple[str, str] | Extraction:
    """An answer with neither a marker nor a box: (raw answer, source) after a phrase ("the answer
    is") or as a terse reply; otherwise no answer, keeping a last line that is maths as the segment."""
    phrase = _last(_PHRASE_MARKER, text)
    stripped = text.strip()
    if phrase is not None:
        raw, _ = _line_after(text, phrase.end())
        return raw, "phrase"
    if stripped and "\n" not in stripped and len(stripped) <= TERSE_CHARS and tail_start == 0:
        return stripped, "terse"
    last_line = stripped.rsplit("\n", 1)[-1] if stripped else ""
    segment = last_line if len(last_line) <= MAX_ANSWER_CHARS and _INLINE_MATH.search(last_line) else ""
    return Extraction(None, (), "none", False, NO_ANSWER, segment)


def _extraction(raw: str, others: list[str], source: str, format_ok: bool, segment: str) -> Extraction:
    """The Extraction of a located raw answer: cleaned, length-checked, other candidates deduplicated."""
    if len(raw) > MAX_ANSWER_CHARS:
        return Extraction(None, (), source, False, TOO_LONG)
    answer = clean(raw)
    if not answer:
        return Extraction(None, (), source, False, NO_ANSWER)
    others = [o for o in (clean(x) for x in others if len(x) <= MAX_ANSWER_CHARS) if o and o != answer]
    group = boxed_group(segment)
    if len(group) > 1:  # maths compares several boxes as one set: {(2,2), (6,2)}
        segment = ", ".join(f"\\boxed{{{c}}}" for c in group)
    return Extraction(answer, tuple(others), source, format_ok, "", segment.strip()[:MAX_ANSWER_CHARS])


def extract(response: str) -> Extraction:
    """The final answer of `response` (see the module docstring for the rules)."""
    thought = after_thinking(response)
    if thought is None:
        return Extraction(None, (), "none", False, NO_ANSWER)
    thinking = thought is not response and bool(response[: len(response) - len(thought)].strip())
    tail_start = max(len(thought) - TAIL_CHARS, 0) or int(thinking)  # thinking is a rationale
    text = thought[max(len(thought) - TAIL_CHARS, 0) :].replace("\r\n", "\n")
    marker = max(
        (m for m in (_last(_FINAL_MARKER, text), _last(_LINE_MARKER, text)) if m),
        key=lambda m: m.end(),
        default=None,
    )
    boxes = all_boxed(text)
    others: list[str] = []
    if marker is not None:
        raw, end = _line_after(text, marker.end())
        raw = _COURTESY.sub("", raw)
        later = [b for b in boxes if b[1] >= end]
        if later:  # "Final answer: By sum-to-product,\n ... \boxed{X}"
            marker_answer = clean(raw) if len(raw) <= MAX_ANSWER_CHARS else ""
            if marker_answer and not has_words(marker_answer):
                others.append(marker_answer)  # a second final answer, unless it is a sentence
            marker = None
            boxes = later
        else:
            earlier = [b for b in boxes if b[1] < marker.start()]
            if len(earlier) == 1:  # one boxed answer, then a Final answer line: both
                others.append(earlier[0][0])  # count; several boxes are intermediate results
            segment = raw
            format_ok = _has_rationale(text, marker.start(), tail_start) and _only_delimiters(text[end:])
            source = "marker"
    if marker is None and boxes:
        last = boxes[-1]
        start = text.rfind("\n", 0, last[1]) + 1
        end = _line_end(text, last[2])
        on_line = [b for b in boxes if b[1] >= start]
        raw = unbox(text[on_line[0][1] : end]) or last[0]  # every box on the line: "\boxed{2} and \boxed{6}"
        segment, source = text[start:end], "boxed"
        format_ok = _has_rationale(text, start, tail_start) and _only_delimiters(text[end:])
    elif marker is None:
        found = _unmarked(text, tail_start)
        if isinstance(found, Extraction):
            return found
        raw, source = found
        raw = _COURTESY.sub("", raw)
        segment = raw
        format_ok = False
    return _extraction(raw, others, source, format_ok, segment)


_LETTER_RUN = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")
_ENVIRONMENT = re.compile(r"\\(?:begin|end)[ \t]*\{[A-Za-z*]*\}")
# Letters that are maths, not words (LaTeX commands such as \\sqrt are skipped anyway).
_MATH_WORDS = {
    "sin",
    "cos",
    "tan",
    "cot",
    "sec",
    "csc",
    "log",
    "exp",
    "sqrt",
    "lim",
    "max",
    "min",
    "gcd",
    "lcm",
    "det",
    "mod",
    "deg",
    "arcsin",
    "arccos",
    "arctan",
    "sinh",
    "cosh",
    "tanh",
    "infty",
    "pi",
}


def has_words(answer: str) -> bool:
    """Is the answer a sentence ("The largest n is 34", "5 apples") rather than an expression?"""
    return any(w.lower() not in _MATH_WORDS for w in _LETTER_RUN.findall(_ENVIRONMENT.sub(" ", answer)))
