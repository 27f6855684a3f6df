"""The build lock of a run folder on object storage: one `mmpr build` per `s3://` prefix.

A local run folder is locked with an flock, which goes away with its process. An object store has no
locks, but S3 has conditional writes: the lock is the object PREFIX/.mmpr-lock, created with
`If-None-Match: *` (S3 refuses the put when the key exists: of two builds starting together, exactly
one creates it). pyarrow's S3 file system cannot send that header, so this module uses boto3.

A killed build cannot remove its lock, so the holder renews it (a put with `If-Match` on its own last
ETag) every RENEW_S seconds, and a lock counts as held only while it is renewed: a lock not renewed
for STALE_S seconds (measured on the store's clock: the age of its Last-Modified at the time of the
answer's Date), or whose holder is a process of this machine that no longer exists, is stale. A new
build takes a stale lock over with a put with `If-Match` on the stale lock's ETag, so of two builds
taking it over at once exactly one wins. The build removes its lock when it ends.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import socket
import threading

from mmpr_pipeline import storage

log = logging.getLogger(__name__)

LOCK_FILE = ".mmpr-lock"
RENEW_S = 10.0
STALE_S = 60.0
TAKEN = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")  # the put's condition failed


def s3_client():
    """A boto3 S3 client with the settings of storage.s3_options: the standard AWS environment (an
    endpoint override from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, read by boto3 itself), timeouts and
    bounded attempts."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=storage.CONNECT_TIMEOUT,
        read_timeout=storage.REQUEST_TIMEOUT,
        retries={"max_attempts": storage.ATTEMPTS, "mode": "standard"},
    )
    return boto3.session.Session().client("s3", config=config)


def _holder_text() -> str:
    return f"mmpr build (pid {os.getpid()} on {socket.gethostname()})"


def _condition_failed(e: Exception) -> bool:
    code = str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
    return code in TAKEN


def read_lock(client, bucket: str, key: str) -> dict | None:
    """The lock object as {holder, host, pid, etag, age_s}, or None when there is none."""
    try:
        got = client.get_object(Bucket=bucket, Key=key)
    except client.exceptions.NoSuchKey:
        return None
    try:
        body = json.loads(got["Body"].read())
    except ValueError:
        body = {}
    now = email.utils.parsedate_to_datetime(got["ResponseMetadata"]["HTTPHeaders"]["date"])
    return dict(
        holder=str(body.get("holder") or "another build"),
        host=body.get("host"),
        pid=body.get("pid"),
        etag=got["ETag"],
        age_s=(now - got["LastModified"]).total_seconds(),
    )


def is_stale(lock: dict) -> bool:
    """Not renewed for STALE_S seconds, or held by a process of this machine that has ended."""
    if lock["age_s"] > STALE_S:
        return True
    if lock["host"] == socket.gethostname() and isinstance(lock["pid"], int):
        try:
            os.kill(lock["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # another user's live process
            return False
    return False


def holder(run: storage.ObjectPath) -> str | None:
    """Who holds the run's lock now (a live, renewed lock of another process), or None."""
    bucket, prefix = storage.split_url(run.url)
    try:
        lock = read_lock(s3_client(), bucket, f"{prefix}/{LOCK_FILE}")
    except Exception:  # noqa: BLE001 - a reader that cannot see the lock treats the run as unlocked
        return None
    if lock is None or is_stale(lock) or lock["holder"] == _holder_text():
        return None
    return lock["holder"]


class ObjectRunLock:
    """`with ObjectRunLock(run):` holds PREFIX/.mmpr-lock for the block, renewing it on a thread."""

    def __init__(self, run: storage.ObjectPath):
        self.run = run
        self.bucket, prefix = storage.split_url(run.url)
        self.key = f"{prefix}/{LOCK_FILE}"
        self.client = s3_client()
        self.etag: str | None = None
        self.stop = threading.Event()
        self.lost = False  # another build took the lock over: it is theirs to remove
        self.thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps(dict(holder=_holder_text(), host=socket.gethostname(), pid=os.getpid())).encode()

    def _put(self, **condition) -> str:
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(), **condition)[
                "ETag"
            ]
        except Exception as e:
            if _condition_failed(e):
                raise _LockTaken from None
            raise storage.StorageError(
                f"{self.run}/{LOCK_FILE}: cannot write the build's lock ({e})"
            ) from None

    def _refuse(self, who: str) -> None:
        from mmpr_pipeline.errors import RunFolderError

        raise RunFolderError(f"{self.run} is in use by {who}; wait for it, or use another --out")

    def __enter__(self) -> ObjectRunLock:
        try:
            self.etag = self._put(IfNoneMatch="*")
        except _LockTaken:
            lock = read_lock(self.client, self.bucket, self.key)
            if lock is not None and not is_stale(lock):
                self._refuse(lock["holder"])
            try:  # taken over from a dead build: exactly one of two takers wins
                self.etag = self._put(IfMatch=lock["etag"]) if lock else self._put(IfNoneMatch="*")
            except _LockTaken:
                self._refuse("another build (it took the stale lock over just now)")
            log.warning("%s: took over the lock of %s (no longer running)", self.run, lock and lock["holder"])
        self.thread = threading.Thread(target=self._renew, name="mmpr-lock-renew", daemon=True)
        self.thread.start()
        return self

    def _renew(self) -> None:
        while not self.stop.wait(RENEW_S):
            try:
                self.etag = self._put(IfMatch=self.etag)
            except _LockTaken:
                self.lost = True
                log.error(
                    "%s: another build took this run's lock over; this build's output may mix", self.run
                )
                return
            except storage.StorageError as e:  # a lost request: the next renewal may pass
                log.warning("%s", e)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        if self.lost:
            return
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key)
        except Exception as e:  # noqa: BLE001 - a lock left behind goes stale (is_stale)
            log.warning("%s/%s: could not remove the build's lock (%s)", self.run, LOCK_FILE, e)


class _LockTaken(Exception):
    """A conditional put of the lock failed: another build holds or just took the lock."""
