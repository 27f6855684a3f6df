"""The Hub's network calls, bounded and quiet: every call has a time limit and a few retries on
transient errors (settings from the environment, `net_settings`), and nothing a library prints or
raises while publishing can show the token (`redacting`)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass

from mmpr_pipeline.errors import PublishError

# --- bounded network calls ---------------------------------------------------------------------


@dataclass(frozen=True)
class NetSettings:
    timeout: float = 60.0  # s: connect, each read or write, and a whole answer after its first byte
    retries: int = 3  # attempts of an idempotent call
    backoff: float = 2.0  # s before the second attempt; doubles after each


def net_settings() -> NetSettings:
    """NetSettings from MMPR_HUB_TIMEOUT, MMPR_HUB_RETRIES, MMPR_HUB_BACKOFF (read at each publish)."""
    values = {}
    for field_name, var, cast, low in (
        ("timeout", "MMPR_HUB_TIMEOUT", float, 0.001),
        ("retries", "MMPR_HUB_RETRIES", int, 1),
        ("backoff", "MMPR_HUB_BACKOFF", float, 0.0),
    ):
        text = os.environ.get(var, "").strip()
        if not text:
            continue
        try:
            value = cast(text)
        except ValueError:
            raise PublishError(
                f"{var}={text!r}: expected a {'whole ' if cast is int else ''}number"
            ) from None
        if not value >= low or value == float("inf"):
            raise PublishError(f"{var}={text!r}: must be a finite number >= {low:g}")
        values[field_name] = value
    return NetSettings(**values)


class _AnswerClock(threading.local):
    deadline: float | None = None  # when the answer now being read must be complete (this thread)


def _bounded_client(limit: float, event_hooks: dict):
    """An httpx2 client for huggingface_hub whose requests cannot hang: httpx2's own timeouts bound
    connecting and each read or write by `limit` seconds; a network stream wrapper bounds a whole
    answer by `limit` from its first byte, so a server that sends one byte a second is cut off too."""
    import httpcore2
    import httpx2

    clock = _AnswerClock()
    Backend = _bounded_backend(limit, clock)

    class Transport(httpx2.HTTPTransport):
        def __init__(self):
            super().__init__()
            # httpx2 has no option for a network backend; its transport's pool is the public
            # httpcore2.ConnectionPool, built here with ours.
            self._pool = httpcore2.ConnectionPool(
                ssl_context=httpx2.create_ssl_context(), network_backend=Backend()
            )

        def handle_request(self, request):
            clock.deadline = None  # a new request: its answer has not started
            return super().handle_request(request)

    return httpx2.Client(
        transport=Transport(), timeout=httpx2.Timeout(limit), follow_redirects=True, event_hooks=event_hooks
    )


def _bounded_backend(limit: float, clock: _AnswerClock):
    """An httpcore2 network backend class whose streams end an answer `limit` seconds after its first
    byte (`clock.deadline`, which the client's transport clears at each request)."""
    import httpcore2

    class Stream(httpcore2.NetworkStream):
        def __init__(self, inner):
            self.inner = inner

        def read(self, max_bytes, timeout=None):
            if clock.deadline is not None:
                left = clock.deadline - time.monotonic()
                if left <= 0:
                    raise httpcore2.ReadTimeout(f"the answer took longer than {limit:g} s")
                timeout = left if timeout is None else min(timeout, left)
            data = self.inner.read(max_bytes, timeout)
            if clock.deadline is None:  # the first byte of the answer: its whole must follow in time
                clock.deadline = time.monotonic() + limit
            return data

        def write(self, buffer, timeout=None):
            self.inner.write(buffer, timeout)

        def close(self):
            self.inner.close()

        def start_tls(self, ssl_context, server_hostname=None, timeout=None):
            return Stream(self.inner.start_tls(ssl_context, server_hostname, timeout))

        def get_extra_info(self, info):
            return self.inner.get_extra_info(info)

    class Backend(httpcore2.NetworkBackend):
        def __init__(self):
            self.inner = httpcore2.SyncBackend()

        def connect_tcp(self, *args, **kwargs):
            return Stream(self.inner.connect_tcp(*args, **kwargs))

        def connect_unix_socket(self, *args, **kwargs):
            return Stream(self.inner.connect_unix_socket(*args, **kwargs))

        def sleep(self, seconds):
            self.inner.sleep(seconds)

    return Backend


@contextlib.contextmanager
def bounded_session(settings: NetSettings):
    """Every huggingface_hub request in this block goes through a `_bounded_client`."""
    from huggingface_hub.utils import get_session, set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    hooks = get_session().event_hooks  # huggingface_hub's own: offline check, request id, debug log
    # A factory, not one client: huggingface_hub closes its client after a connection error.
    set_client_factory(lambda: _bounded_client(settings.timeout, hooks))
    try:
        yield
    finally:
        set_client_factory(default_client_factory)


def _transient(e: Exception) -> bool:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(e, HfHubHTTPError):
        return e.response is not None and e.response.status_code in (408, 429, 500, 502, 503, 504)
    return isinstance(e, (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError))


def with_retries(what: str, call, settings: NetSettings, token: str | None):
    """`call()` (an idempotent request), tried up to `settings.retries` times on transient failures."""
    for attempt in range(1, settings.retries + 1):
        try:
            return call()
        except Exception as e:
            if attempt == settings.retries or not _transient(e):
                raise
            wait = settings.backoff * 2 ** (attempt - 1)
            reason = redact(f"{type(e).__name__}: {e}".splitlines()[0], token)
            print(
                f"note: {what} failed ({reason}); attempt {attempt + 1} of {settings.retries} in {wait:g} s",
                file=sys.stderr,
            )
            time.sleep(wait)


# --- never print the token ---------------------------------------------------------------------


class _RedactingStream:
    """A text stream that writes through to `inner` with the token replaced."""

    def __init__(self, inner, token: str):
        self.inner, self.token = inner, token

    def write(self, text):
        return self.inner.write(redact(text, self.token))

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __getattr__(self, name):  # flush, isatty, fileno, encoding...
        return getattr(self.inner, name)


@contextlib.contextmanager
def redacting(token: str | None):
    """Replace `token` in everything written to stdout, stderr and the log handlers in this block."""
    if not token:
        yield
        return
    loggers = [
        logging.getLogger(),
        *(lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)),
    ]
    # every logger's handlers: huggingface_hub, for one, has its own handler on stderr
    handlers = list(
        {
            id(h): h
            for lg in loggers
            for h in lg.handlers
            if isinstance(h, logging.StreamHandler)
            and not isinstance(getattr(type(h), "stream", None), property)
        }.values()
    )  # a property follows sys.stderr
    saved = sys.stdout, sys.stderr, [h.stream for h in handlers]
    sys.stdout, sys.stderr = _RedactingStream(sys.stdout, token), _RedactingStream(sys.stderr, token)
    for h in handlers:
        h.setStream(_RedactingStream(h.stream, token))
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved[0], saved[1]
        for h, stream in zip(handlers, saved[2]):
            h.setStream(stream)


def redact(text: str, token: str | None) -> str:
    return text.replace(token, "<token>") if token else text
