"""The build's progress as users read it: questions sampled so far (as each question's request
finishes), tokens per second and an ETA; then work units judged, paired and written.

The sampler runs in Ray actors, so its counts come back through one small actor (`SampleCounter`):
each replica adds up its finished questions and their tokens and sends the two numbers at most every
half second (`CounterClient`); a driver thread polls the totals. Only counters travel, never rows.
"""

from __future__ import annotations

import threading
import time
from typing import Any, TextIO

SEND_EVERY_S = 0.5  # a replica's counts reach the driver at most this late
POLL_EVERY_S = 0.5
REFRESH_TIMEOUT_S = 2.0  # the most one poll of the counter actor waits


class SampleCounter:
    """Questions and generated tokens sampled so far, summed over the replicas (a Ray actor)."""

    def __init__(self):
        self.questions = 0
        self.tokens = 0

    def add(self, questions: int, tokens: int) -> None:
        self.questions += questions
        self.tokens += tokens

    def totals(self) -> tuple[int, int]:
        return self.questions, self.tokens


def start_counter():
    """A SampleCounter actor: no CPU reserved, so it never waits for one on a full machine."""
    import ray

    return ray.remote(num_cpus=0)(SampleCounter).remote()


class CounterClient:
    """A replica's side of the counter: counts locally, sends at most every SEND_EVERY_S."""

    def __init__(self, counter):
        self.counter = counter
        self.questions = self.tokens = 0
        self.sent_at = time.monotonic()

    def add(self, questions: int, tokens: int) -> None:
        self.questions += questions
        self.tokens += tokens
        if time.monotonic() - self.sent_at >= SEND_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self.questions or self.tokens:
            self.counter.add.remote(self.questions, self.tokens)  # fire and forget
        self.questions = self.tokens = 0
        self.sent_at = time.monotonic()


class BuildProgress:
    """Two bars on `file`: "sample" (questions of the units to do, with tok/s and tqdm's ETA) moved by
    a thread that polls the counter, and "judge+pair+write" (work units) moved by `unit_done`. Rows
    set aside at load are never sampled: they count as done when their unit is written."""

    def __init__(self, counter, rows: int, units: int, file: TextIO):
        from tqdm import tqdm

        self.counter = counter
        self.set_aside = 0
        self.sampled = 0
        self.first_tokens: tuple[float, int, int] | None = None  # (when, tokens, questions) first seen
        self.lock = threading.Lock()
        self.stop = threading.Event()
        # a terminal redraws in place; a log file (CI, a pipe) gets a line every few seconds, not each poll
        self.tty = file.isatty()
        bar = dict(file=file, dynamic_ncols=True, mininterval=0.1 if self.tty else 3.0)
        # tqdm's ETA would count the engine's start as sampling time (48 s for the first question,
        # then "2:35:21" left on the demo): the ETA and rates here start with the first counts.
        self.sample_bar = tqdm(
            total=rows,
            desc="sample",
            unit="q",
            position=0,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
            postfix="starting the engine",
            **bar,
        )
        self.write_bar = tqdm(total=units, desc="judge+pair+write", unit="unit", position=1, **bar)
        self.thread = threading.Thread(target=self._poll, name="build-progress", daemon=True)

    def __enter__(self) -> BuildProgress:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        # Longer than one poll can take (REFRESH_TIMEOUT_S): the thread must be out of ray.get before
        # the caller may shut Ray down (a ray.get after ray.shutdown ends the process with exit code 1).
        self.thread.join(timeout=REFRESH_TIMEOUT_S + 5)
        if exc[0] is None:
            self._refresh()
            with self.lock:  # every row and unit is accounted for once the stream has ended
                self.sample_bar.update(self.sample_bar.total - self.sample_bar.n)
                self.write_bar.update(self.write_bar.total - self.write_bar.n)  # units with no question
        self.sample_bar.close()
        self.write_bar.close()

    def unit_done(self, summary: dict[str, Any]) -> None:
        with self.lock:
            self.set_aside += summary["rows"] - summary["questions"]
            self.write_bar.update(1)
        self._refresh()

    def _rates(self, now: float, questions: int, tokens: int) -> str:
        """ "ETA 1:05, 3.2 q/s, 8,940 tok/s", measured since the first counts arrived."""
        since, tokens0, questions0 = self.first_tokens
        q_rate = (questions - questions0) / (now - since)
        left = self.sample_bar.total - questions - self.set_aside
        eta = f"ETA {self.sample_bar.format_interval(left / q_rate)}, " if q_rate > 0 and left > 0 else ""
        return f"{eta}{q_rate:.1f} q/s, {(tokens - tokens0) / (now - since):,.0f} tok/s"

    def _poll(self) -> None:
        while not self.stop.wait(POLL_EVERY_S):
            self._refresh()

    def _refresh(self) -> None:
        import ray

        try:
            questions, tokens = ray.get(self.counter.totals.remote(), timeout=REFRESH_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a progress bar never stops a build
            return
        now = time.monotonic()
        with self.lock:
            if self.first_tokens is None and tokens:
                self.first_tokens = (now, tokens, questions)
                self.sample_bar.set_postfix_str("sampling", refresh=False)
            if self.first_tokens and now - self.first_tokens[0] >= 1:
                self.sample_bar.set_postfix_str(self._rates(now, questions, tokens), refresh=False)
            done = min(self.sample_bar.total, questions + self.set_aside)
            if done > self.sample_bar.n:
                self.sample_bar.update(done - self.sample_bar.n)
            elif self.tty:  # elapsed time and tok/s move on while a long request runs
                self.sample_bar.refresh()
