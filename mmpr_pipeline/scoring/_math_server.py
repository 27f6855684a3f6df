"""The symbolic check's server process: `python _math_server.py` (stdlib + math-verify only).

Why a process: math-verify's own timeouts use `signal.alarm`, which only works in a main thread,
and a pure C computation (a huge integer power) cannot be interrupted at all. So every check runs
in a child forked from this server and is killed with SIGKILL when its budget runs out. The
server itself only reads, forks and waits, so no input can stall it; it imports sympy once, and
forking keeps that import warm for every check.

Protocol, one JSON object per line:
    stdin : {"id": int, "pred": str, "gold": [str, ...], "mode": "plain" | "text", "plain": str | null,
             "budget": seconds}
    stdout: {"ready": true}                       once, after start-up
            {"id": int, "status": "equal" | "different" | "unparsable" | "timeout" | "error",
             "detail": str}
The server exits when stdin closes (its parent died or closed it), killing running children.
"""

import json
import logging
import os
import select
import signal
import sys
import time

MAX_CHILDREN = 8  # concurrent checks; more requests wait (their budget keeps running)
CHILD_MEMORY = 2 << 30  # address space a check may add on top of the server's, bytes


def _as_sets(exprs: list) -> list | None:
    """`x \\geq 5` as the interval it describes, so that it can equal `[5, \\infty)`; None when
    there is no such relation among `exprs`."""
    from sympy import Eq, Symbol
    from sympy.logic.boolalg import Boolean

    out, changed = [], False
    for e in exprs:
        # a bare Symbol is a Boolean too, and every one's set is UniversalSet: `E` would equal `d`
        if (
            isinstance(e, Boolean)
            and not isinstance(e, (Eq, Symbol))
            and len(getattr(e, "free_symbols", ())) == 1
        ):
            try:
                e, changed = e.as_set(), True
            except Exception:  # noqa: BLE001 - not every relation has a set; keep it as it is
                pass
        out.append(e)
    return out if changed else None


def check(pred: str, golds: list[str], mode: str = "plain", plain: str | None = None) -> str:
    """math-verify (parse + verify) on one answer against the references.

    mode "plain": `pred` is the cleaned answer, read as LaTeX (`$pred$`).
    mode "text": `pred` is the raw final-answer segment ("The largest $n$ is 34."); math-verify's
    own extraction finds the answer in it: boxed first, then LaTeX and plain numbers, the last one.
    `plain`, if given, is also read as LaTeX ("12 \\text{ cm}" is maths although it has a word).
    "equal" when a reading equals a reference; else "different" when one parsed; else "unparsable".
    What reaches sympy: LaTeX through latex2sympy's grammar, and through `parse_expr` only the
    text math-verify's expression pattern admits (digits, `.`, spaces, + - * / ^ × ÷ and
    parentheses), never names. Decimals equal a reference after rounding both to 6 places
    (verify's float_rounding=6, the stated precision).
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    latex = [LatexExtractionConfig(boxed_match_priority=0)]

    def parsed(s: str, config) -> list:
        return parse(s, extraction_config=config, fallback_mode="no_fallback", parsing_timeout=None)

    def equal(gold_parsed: list, pred_parsed: list) -> bool:
        if verify(gold_parsed, pred_parsed, float_rounding=6, timeout_seconds=None):
            return True
        gold_sets, pred_sets = _as_sets(gold_parsed), _as_sets(pred_parsed)
        return (gold_sets is not None or pred_sets is not None) and verify(
            gold_sets or gold_parsed, pred_sets or pred_parsed, float_rounding=6, timeout_seconds=None
        )

    readings = [
        parsed(pred, latex + [ExprExtractionConfig()]) if mode == "text" else parsed(f"${pred}$", latex)
    ]
    if mode == "text" and plain:
        readings.append(parsed(f"${plain}$", latex))
    readings = [r for r in readings if r]
    if not readings:
        return "unparsable"
    golds_parsed = []
    for gold in golds:
        delimited = any(d in gold for d in ("$", "\\boxed", "\\(", "\\["))
        golds_parsed.append(parsed(gold if delimited else f"${gold}$", latex))
    for pred_parsed in readings:
        if any(g and equal(g, pred_parsed) for g in golds_parsed):
            return "equal"
    return "different"


def _child(request: dict, write_fd: int) -> None:
    """Runs in the forked child: bounded by an itimer (default action kills) and an address limit."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # kills even inside a C computation
    signal.setitimer(signal.ITIMER_REAL, float(request["budget"]) + 0.5)
    try:
        import resource

        pages = int(open("/proc/self/statm").read().split()[0])
        limit = pages * os.sysconf("SC_PAGE_SIZE") + CHILD_MEMORY
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (OSError, ValueError, ImportError):
        pass
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)  # nothing may write into the reply channel
    try:
        status, detail = (
            check(request["pred"], request["gold"], request.get("mode", "plain"), request.get("plain")),
            "",
        )
    except MemoryError:
        status, detail = "error", "memory limit"
    except RecursionError:
        status, detail = "error", "too deeply nested"
    except Exception as e:  # noqa: BLE001 - any failure of a check is a verdict, not a crash
        status, detail = "error", f"{type(e).__name__}: {e}"[:200]
    os.write(write_fd, json.dumps({"status": status, "detail": detail}).encode())
    os._exit(0)


def _reply(message: dict) -> None:
    try:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()
    except OSError:  # the parent is gone; running children end by their own timers
        os._exit(0)


def _start_queued(queue: list, running: dict, now: float) -> None:
    """Fork a checker for queued requests while fewer than MAX_CHILDREN run; a request whose deadline
    passed in the queue is answered as a timeout instead."""
    while queue and len(running) < MAX_CHILDREN:
        request, deadline = queue.pop(0)
        if deadline <= now:
            _reply({"id": request["id"], "status": "timeout", "detail": "waited too long"})
            continue
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _child({**request, "budget": deadline - now}, write_fd)
        os.close(write_fd)
        running[read_fd] = [pid, request["id"], deadline, b""]


def _read_requests(stdin_fd: int, inbox: bytes, queue: list, running: dict) -> tuple[bool, bytes]:
    """Queue each complete request line read from stdin: (stdin still open, unfinished bytes). At end of
    input the running children are killed (their verdicts are no longer wanted)."""
    chunk = os.read(stdin_fd, 65536)
    if not chunk:
        for job in running.values():
            os.kill(job[0], signal.SIGKILL)
        return False, inbox
    inbox += chunk
    while b"\n" in inbox:
        line, inbox = inbox.split(b"\n", 1)
        request = json.loads(line)
        queue.append((request, time.monotonic() + float(request["budget"])))
    return True, inbox


def _collect_child(fd: int, running: dict) -> None:
    """Read a child's verdict bytes; once its pipe closes, reap it and reply with its verdict."""
    chunk = os.read(fd, 65536)
    if chunk:
        running[fd][3] += chunk
        return
    pid, request_id, _, received = running.pop(fd)
    os.close(fd)
    os.waitpid(pid, 0)
    try:
        result = json.loads(received)
    except ValueError:
        result = {"status": "error", "detail": "check process died"}
    _reply({"id": request_id, **result})


def _kill_overdue(running: dict, now: float) -> None:
    """Kill and answer as timeouts the children still running past their deadline."""
    for fd in [fd for fd, job in running.items() if job[2] <= now]:
        pid, request_id, _, _ = running.pop(fd)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)
        _reply({"id": request_id, "status": "timeout", "detail": ""})


def main() -> None:
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled" warnings
    check("\\frac{1}{2}", ["0.5"])  # warm sympy caches before forking
    check("So $x \\geq 1$ or 1/2.", ["[1, \\infty)"], "text")
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    _reply({"ready": True})

    stdin_fd = sys.stdin.fileno()
    inbox, queue = b"", []
    running = {}  # read fd -> [pid, id, deadline, received bytes]
    stdin_open = True
    while stdin_open or running:
        now = time.monotonic()
        _start_queued(queue, running, now)
        wait = min([job[2] for job in running.values()] + [now + 60.0]) - now
        fds = ([stdin_fd] if stdin_open else []) + list(running)
        readable, _, _ = select.select(fds, [], [], max(wait, 0.0))
        for fd in readable:
            if fd == stdin_fd:
                stdin_open, inbox = _read_requests(stdin_fd, inbox, queue, running)
            else:
                _collect_child(fd, running)
        _kill_overdue(running, time.monotonic())


if __name__ == "__main__":
    main()
