"""The bounded symbolic check: math-verify in a server process, behind a screen for absurd input.

Model output is untrusted text that would otherwise reach a computer algebra system. Three layers:
1. `screen` rejects what no real answer looks like and what would stall sympy before any work is
   done: over-long text, deep nesting, numeric power towers (`9**9**9**9`, `10^{10^{10^{10}}}`),
   huge exponents, factorials and digit runs, and code-like text (`__`, `import`, ...).
2. Model text reaches sympy only through math-verify's LaTeX parser (`LatexExtractionConfig`,
   grammar-based) and, for a final answer written in words, its expression extraction, whose
   pattern admits only digits, `.`, spaces, arithmetic operators and parentheses into
   `parse_expr` (tests/test_scoring_safety.py checks this). Our code never calls `eval`,
   `sympify` or `parse_expr`.
3. The check runs in `_math_server.py`, a persistent process that forks one child per check and
   kills it when the budget runs out. Waiting on a pipe needs no signals, so the bound holds in
   any thread, in any process, inside Ray actors too.

The bound covers the check, not the one-time start of the server process (about 1 s, paid by the
first symbolic check of a process; call `warm_up()` up front to pay it early).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import subprocess
import sys
import threading
from collections import OrderedDict
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

MAX_MATH_CHARS = 1000  # longer "answers" are not answers
MAX_DEPTH = 16  # bracket nesting; latex2sympy recurses per level
MAX_EXPONENT = 10_000  # integer exponent literal; 9^99999999 alone has 95 million digits
MAX_FACTORIAL = 1_000
MAX_DIGITS = 200  # one run of digits
STARTUP_TIMEOUT = 60.0  # seconds the server may take to import sympy and math-verify
GRACE = 0.25  # seconds a server gets past a check's budget before it is presumed stuck

_SERVER_SCRIPT = Path(__file__).with_name("_math_server.py")
_POWER = re.compile(r"\^|\*\*")
# Python, not maths: `__`, a call of a dangerous name, `import x`, `lambda x:`, `os.`. (`\\lambda`
# is LaTeX, and "the open interval" is English.)
_CODE_LIKE = re.compile(
    r"__|(?<![\\\w])(?:import|exec|eval|compile|getattr|setattr|globals|locals|open|"
    r"subprocess|system|popen)[ \t]*\(|(?<![\\\w])(?:import[ \t]+\w|from[ \t]+\w+[ \t]+import\b|"
    r"lambda[ \t]*\w*[ \t]*:)|\bos\.|\bsys\."
)
_DIGIT_RUN = re.compile(rf"\d{{{MAX_DIGITS + 1}}}")
_FACTORIAL = re.compile(r"(\d+)\s*!")
_INTEGER = re.compile(r"\d+")
_COMMAND = re.compile(r"\\[a-zA-Z]+")
_WORD = re.compile(r"[-+]?[\w.]+")
# An exponent made only of numbers, operators and layout commands is evaluated by sympy.
_NUMERIC_EXPONENT = re.compile(r"(?:[\d\s{}()\[\].,+\-*/^!]|\\(?:left|right|cdot|times|[dt]?frac|!|,|;|\s))*")


def _bracket_pairs(s: str) -> dict[int, int]:
    """Index of each opening bracket -> index of its closing one (unclosed: len(s))."""
    pairs, stack = {}, []
    for i, ch in enumerate(s):
        if ch in "{([":
            stack.append(i)
        elif ch in "})]" and stack:
            pairs[stack.pop()] = i
    for i in stack:
        pairs[i] = len(s)
    return pairs


def _operand_end(s: str, i: int, pairs: dict[int, int]) -> int:
    """Index just past the operand that starts at `i` (after spaces): a bracket group, a LaTeX
    command with its braced arguments, or a signed run of word characters."""
    n = len(s)
    while i < n and s[i] == " ":
        i += 1
    if i < n and s[i] in "{([":
        return min(pairs[i] + 1, n)
    if i < n and s[i] == "\\":
        m = _COMMAND.match(s, i)
        j = m.end() if m else i + 2
        while j < n and s[j] == "{":
            j = min(pairs[j] + 1, n)
        return j
    m = _WORD.match(s, i)
    return m.end() if m else i


def screen(expr: str) -> str | None:
    """Why `expr` must not reach sympy, or None when it may (then still under the time bound)."""
    if len(expr) > MAX_MATH_CHARS:
        return f"longer than {MAX_MATH_CHARS} characters"
    if _CODE_LIKE.search(expr):
        return "looks like code"
    depth = deepest = 0
    for ch in expr:
        if ch in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "})]":
            depth -= 1
    if deepest > MAX_DEPTH:
        return f"nested deeper than {MAX_DEPTH}"
    if _DIGIT_RUN.search(expr):
        return f"a number longer than {MAX_DIGITS} digits"
    for m in _FACTORIAL.finditer(expr):
        if int(m.group(1)) > MAX_FACTORIAL:
            return f"a factorial above {MAX_FACTORIAL}!"
    pairs = _bracket_pairs(expr)
    for m in _POWER.finditer(expr):
        end = _operand_end(expr, m.end(), pairs)
        while True:  # a ^ b ^ c: the exponent is b ^ c
            j = end
            while j < len(expr) and expr[j] == " ":
                j += 1
            nxt = _POWER.match(expr, j)
            if not nxt:
                break
            end = _operand_end(expr, nxt.end(), pairs)
        exponent = expr[m.end() : end]
        if _NUMERIC_EXPONENT.fullmatch(exponent):
            if _POWER.search(exponent) or "!" in exponent:
                return "a numeric power tower"
            if any(int(x) > MAX_EXPONENT for x in _INTEGER.findall(exponent)):
                return f"an exponent above {MAX_EXPONENT}"
    return None


class _Server:
    """One `_math_server.py` process, with a reader thread that hands replies to waiting callers."""

    def __init__(self):
        self.pid = os.getpid()
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(_SERVER_SCRIPT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.ready = threading.Event()
        self.dead = False
        self.lock = threading.Lock()
        self.pending: dict[int, Future] = {}
        self.next_id = 0
        threading.Thread(target=self._read, name="mmpr-math-reader", daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            message = json.loads(line)
            if message.get("ready"):
                self.ready.set()
                continue
            with self.lock:
                future = self.pending.pop(message["id"], None)
            if future is not None:
                future.set_result(message)
        with self.lock:  # EOF: the server is gone
            self.dead = True
            waiting, self.pending = self.pending, {}
        self.ready.set()
        for future in waiting.values():
            future.set_result({"status": "error", "detail": "math server exited"})

    def ask(
        self, pred: str, golds: list[str], budget: float, mode: str = "plain", plain: str | None = None
    ) -> dict:
        future: Future = Future()
        with self.lock:
            if self.dead:
                return {"status": "error", "detail": "math server exited"}
            request_id, self.next_id = self.next_id, self.next_id + 1
            self.pending[request_id] = future
            try:
                self.proc.stdin.write(
                    json.dumps(
                        {
                            "id": request_id,
                            "pred": pred,
                            "gold": golds,
                            "mode": mode,
                            "plain": plain,
                            "budget": budget,
                        }
                    ).encode()
                    + b"\n"
                )
                self.proc.stdin.flush()
            except OSError:
                self.pending.pop(request_id, None)
                self.dead = True
                return {"status": "error", "detail": "math server exited"}
        try:
            return future.result(timeout=budget + GRACE)
        except FutureTimeout:  # the server itself is stuck: replace it
            with self.lock:
                self.pending.pop(request_id, None)
                self.dead = True
            self.close()
            return {"status": "timeout", "detail": "math server did not answer"}

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=1.0)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


_server: _Server | None = None
_server_lock = threading.Lock()
_cache: OrderedDict[tuple, str] = OrderedDict()
_CACHE_SIZE = 4096


def _get_server() -> _Server:
    """The process's server, started on first use (and again after a fork or a crash)."""
    global _server
    with _server_lock:
        if _server is None or _server.dead or _server.pid != os.getpid():
            if _server is not None and _server.pid == os.getpid():
                _server.close()
            _server = _Server()
        server = _server
    if not server.ready.wait(STARTUP_TIMEOUT) or server.dead:
        raise RuntimeError(f"the math server ({_SERVER_SCRIPT}) did not start; is math-verify installed?")
    return server


def warm_up() -> None:
    """Start this process's math server now, so the first symbolic check is not slowed by it."""
    _get_server()


@atexit.register
def shutdown() -> None:
    """Stop this process's math server (it would also stop by itself when this process exits)."""
    global _server
    with _server_lock:
        if _server is not None and _server.pid == os.getpid():
            _server.close()
        _server = None


def symbolic_check(
    pred: str, golds: list[str], timeout: float = 2.0, mode: str = "plain", plain: str | None = None
) -> tuple[str, str]:
    """Compare LaTeX/plain math `pred` with each of `golds` symbolically, within `timeout` seconds.
    mode "text": `pred` is a final-answer segment in words; math-verify extracts the answer from it,
    and `plain` (the cleaned answer) is also read as LaTeX.

    Returns (status, detail); status is one of "equal", "different", "unparsable", "unsafe",
    "timeout", "error". Never evaluates text as code; never takes longer than `timeout` (plus a
    few milliseconds) once the server is up, in any thread.
    """
    why = screen(pred)
    if why:
        return "unsafe", why
    if plain is not None and screen(plain):
        plain = None
    key = (pred, tuple(golds), mode, plain)
    with _server_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key], "cached"
    server = _get_server()
    reply = server.ask(pred, list(golds), max(timeout - GRACE, 0.05), mode, plain)
    status, detail = reply["status"], reply.get("detail", "")
    if status in ("equal", "different", "unparsable"):
        with _server_lock:
            _cache[key] = status
            if len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    return status, detail
