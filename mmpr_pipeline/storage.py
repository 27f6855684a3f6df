"""Where files live: a local path or an `s3://bucket/key` URL, read through pyarrow's file systems.

`filesystem(path)` gives (pyarrow file system, path inside it) for either kind, so a reader has one code
path. S3 takes its credentials from the standard AWS chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN, AWS_PROFILE and ~/.aws files, instance metadata), its region from AWS_REGION or
AWS_DEFAULT_REGION, and an endpoint for S3-compatible stores (MinIO, moto) from AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL, as the AWS SDKs do. Every request has a connect and a read timeout and a bounded
number of attempts: an unreachable or silent endpoint is an error within seconds, never a hang.
"""

from __future__ import annotations

import atexit
import fnmatch
import functools
import io
import os
import posixpath
import re
import shutil
import tempfile

SCHEMES = ("s3",)
GLOB_CHARS = "*?["
CONNECT_TIMEOUT = 10.0  # seconds to open a connection
REQUEST_TIMEOUT = 30.0  # seconds without a byte before a request is given up
ATTEMPTS = 3  # per request, with the SDK's backoff between them
READ_BUFFER = 1 << 20  # a line-by-line reader would otherwise make one request per line
ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # the service-specific one wins, as in the SDKs
_ENV_KEYS = ENDPOINT_VARS + (
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
)
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")  # S3's bucket naming rules


class StorageError(OSError):
    """A file or object that cannot be listed or read; the message names its path or URL."""


def is_url(path: str) -> bool:
    return isinstance(path, str) and "://" in path


def has_glob(path: str) -> bool:
    return any(c in path for c in GLOB_CHARS)


def url_problem(url: str) -> str | None:
    """Why `url` is not a usable source URL, or None (for recipe validation: no request is made)."""
    scheme, _, rest = url.partition("://")
    if scheme not in SCHEMES:
        return f"unsupported URL scheme {scheme + '://'!r}: use a local path or {', '.join(SCHEMES)}:// URLs"
    bucket = rest.partition("/")[0]
    if not bucket:
        return f"{url!r} names no bucket (s3://BUCKET/KEY)"
    if has_glob(bucket):
        return f"{url!r}: a bucket name cannot be a pattern (only the key may hold *, ? or [...])"
    if not _BUCKET.fullmatch(bucket):
        return f"{url!r}: {bucket!r} is not a valid bucket name (3-63 of a-z, 0-9, '.', '-')"
    return None


def split_url(url: str) -> tuple[str, str]:
    """(bucket, key) of an s3:// URL; StorageError for a URL that is not one."""
    problem = url_problem(url)
    if problem:
        raise StorageError(problem)
    bucket, _, key = url.partition("://")[2].partition("/")
    return bucket, key


def endpoint() -> tuple[str, str] | None:
    """(variable, value) of the S3 endpoint override in this process's environment, if any."""
    for name in ENDPOINT_VARS:
        if os.environ.get(name):
            return name, os.environ[name]
    return None


def s3_options() -> dict:
    """pyarrow.fs.S3FileSystem's keyword arguments from this process's environment."""
    import pyarrow.fs as pafs

    opts = dict(
        connect_timeout=CONNECT_TIMEOUT,
        request_timeout=REQUEST_TIMEOUT,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=ATTEMPTS),
    )
    override = endpoint()
    if override:
        name, value = override
        scheme, sep, rest = value.partition("://")
        host = rest.split("/")[0]
        if not sep or scheme not in ("http", "https") or not host:
            raise StorageError(f"{name}={value!r}: expected http://HOST[:PORT] or https://HOST[:PORT]")
        opts.update(endpoint_override=host, scheme=scheme)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts["region"] = region
    return opts


@functools.lru_cache(maxsize=8)
def _s3(_env: tuple, _timeouts: tuple):
    """One S3 file system per process and environment (a client is costly to make; the key holds the
    settings it was made from, so a changed environment makes a new one)."""
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(**s3_options())


def filesystem(path: str):
    """(pyarrow file system, path inside it) of a local path or an s3:// URL."""
    import pyarrow.fs as pafs

    if not is_url(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    bucket, key = split_url(path)
    env = tuple(os.environ.get(k) for k in _ENV_KEYS)
    return _s3(env, (CONNECT_TIMEOUT, REQUEST_TIMEOUT, ATTEMPTS)), f"{bucket}/{key}".rstrip("/")


def _failure(url: str, e: Exception) -> StorageError:
    if isinstance(e, StorageError):
        return e
    if isinstance(e, FileNotFoundError):
        return StorageError(f"{url}: no such object")
    text, hint = str(e), ""
    if any(word in text for word in ("ACCESS_KEY", "ACCESS_DENIED", "SIGNATURE", "credentials")):
        hint = (
            " (keys from the AWS environment: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE,"
            " ~/.aws)"
        )
    elif "NETWORK_CONNECTION" in text:
        override = endpoint()
        hint = (
            f" (endpoint {override[0]}={override[1]})"
            if override
            else " (AWS's endpoint: no AWS_ENDPOINT_URL_S3)"
        )
    return StorageError(f"{url}: {text}{hint}")


def _segments_match(key: str, pattern: str) -> bool:
    """`pattern` matches `key` as glob.glob matches a path: `*` and `?` never cross a '/'."""
    parts, pats = key.split("/"), pattern.split("/")
    return len(parts) == len(pats) and all(fnmatch.fnmatchcase(k, p) for k, p in zip(parts, pats))


def expand(url: str) -> list[str]:
    """The objects of an s3:// URL, sorted: the object itself, every object under a folder (a prefix
    ending at a '/'), or those whose keys match a glob (`*`, `?`, `[...]` within one path segment).
    StorageError when nothing is there at all, or the bucket cannot be listed."""
    import pyarrow.fs as pafs

    fs, path = filesystem(url)
    bucket = path.split("/")[0]
    try:
        if has_glob(path):
            fixed = path[: min(path.index(c) for c in GLOB_CHARS if c in path)]
            base = fixed.rsplit("/", 1)[0]
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            if not infos and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise StorageError(f"{url}: the bucket {bucket!r} does not exist")
            found = [i.path for i in infos if i.type == pafs.FileType.File and _segments_match(i.path, path)]
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                    raise StorageError(f"{url}: the bucket {bucket!r} does not exist")
                raise StorageError(f"{url}: no such object or folder")
            if info.type == pafs.FileType.File:
                found = [path]
            else:
                infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
                found = [i.path for i in infos if i.type == pafs.FileType.File]
    except (OSError, ValueError) as e:
        raise _failure(url, e) from None
    return [f"s3://{p}" for p in sorted(found)]


def open_input(path: str):
    """A buffered binary reader of a local file or an object (seekable: a JSON Lines unit starts at
    its byte offset)."""
    if not is_url(path):
        return open(path, "rb")
    fs, inner = filesystem(path)
    try:
        return io.BufferedReader(fs.open_input_file(inner), READ_BUFFER)
    except (OSError, ValueError) as e:
        raise _failure(path, e) from None


def read_bytes(url: str, limit: int) -> bytes:
    """At most `limit` bytes of an object, from its start."""
    fs, inner = filesystem(url)
    try:
        with fs.open_input_file(inner) as f:
            return f.read(limit)
    except (OSError, ValueError) as e:
        raise _failure(url, e) from None


def parent(path: str) -> str:
    """The folder of a local file, or the prefix of an object (its URL up to the last '/')."""
    return path.rsplit("/", 1)[0] if is_url(path) else os.path.dirname(path)


def join(folder: str, relative: str) -> str:
    """`relative` read from `folder`: a URL stays itself; a key relative to an object's prefix becomes a
    URL ('..' resolved, as a file system would); a local path joins as pathlib does."""
    if is_url(relative):
        return relative
    if is_url(folder):
        scheme, _, rest = folder.partition("://")
        bucket, _, prefix = rest.partition("/")
        key = posixpath.normpath(posixpath.join("/", prefix, relative)).lstrip("/")
        return f"{scheme}://{bucket}/{key}"
    return relative if os.path.isabs(relative) else os.path.join(folder, relative)


def local_copy(url: str) -> str:
    """A folder on object storage copied to a temporary folder of this process (removed at its exit):
    for readers that need a local file system (`datasets.load_from_disk` memory-maps its files)."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(url)
    try:
        if fs.get_file_info(inner).type != pafs.FileType.Directory:
            raise StorageError(f"{url}: no such folder")
        dest = tempfile.mkdtemp(prefix="mmpr-copy-")
        atexit.register(shutil.rmtree, dest, ignore_errors=True)
        pafs.copy_files(inner, dest, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except (OSError, ValueError) as e:
        raise _failure(url, e) from None
    return dest


def download(folder: ObjectPath, relatives: list[str], dest) -> None:
    """Copy `relatives` (paths under `folder` on object storage) to the same paths under the local
    folder `dest`, streamed (for writers that need local files: `upload_folder` reads a folder)."""
    import pyarrow.fs as pafs

    local = pafs.LocalFileSystem()
    for rel in relatives:
        source = folder / rel
        fs, inner = source._fs()
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            pafs.copy_files(inner, target, source_filesystem=fs, destination_filesystem=local)
        except (OSError, ValueError) as e:
            raise _failure(source.url, e) from None


# -- run folders on object storage ----------------------------------------------------------------


class ObjectPath:
    """An object (or a prefix, standing for a folder) under an s3:// URL, with the part of pathlib.Path's
    interface a run folder's readers and writers use, so one code path serves both kinds of run folder.

    Object stores have no folders and no rename: `mkdir` does nothing, a prefix "exists" as a folder when
    objects lie under it, and writes go to their final key (an object appears whole when its upload
    completes, never half-written). Pickles as its URL: Ray workers get it as it is."""

    def __init__(self, url: str):
        problem = url_problem(url)
        if problem:
            raise StorageError(problem)
        self.url = url.rstrip("/")

    # naming
    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"ObjectPath({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other: ObjectPath) -> bool:
        return self.url < other.url

    def __truediv__(self, part) -> ObjectPath:
        return ObjectPath(f"{self.url}/{str(part).strip('/')}")

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.url.rsplit("/", 1)[0])

    @property
    def parents(self) -> list[ObjectPath]:
        out, p = [], self
        while p.url.count("/") > 2:
            p = p.parent
            out.append(p)
        return out

    def with_name(self, name: str) -> ObjectPath:
        return self.parent / name

    def with_suffix(self, suffix: str) -> ObjectPath:
        return self.with_name(self.stem + suffix)

    def relative_to(self, other) -> posixpath:
        from pathlib import PurePosixPath

        base = str(other).rstrip("/") + "/"
        if not self.url.startswith(base):
            raise ValueError(f"{self.url} is not under {other}")
        return PurePosixPath(self.url[len(base) :])

    def resolve(self) -> ObjectPath:
        return self

    def absolute(self) -> ObjectPath:
        return self

    # what is there
    def _fs(self):
        return filesystem(self.url)

    def _info(self):
        fs, inner = self._fs()
        try:
            return fs.get_file_info(inner)
        except (OSError, ValueError) as e:
            raise _failure(self.url, e) from None

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.Directory

    def stat(self):
        import types

        info = self._info()
        if info.size is None:
            raise FileNotFoundError(self.url)
        mtime = info.mtime.timestamp() if info.mtime else 0.0
        return types.SimpleNamespace(st_size=info.size, st_mtime=mtime, st_mtime_ns=int(mtime * 1e9))

    def _listing(self, recursive: bool) -> list:
        import pyarrow.fs as pafs

        fs, inner = self._fs()
        try:
            return fs.get_file_info(pafs.FileSelector(inner, recursive=recursive, allow_not_found=True))
        except (OSError, ValueError) as e:
            raise _failure(self.url, e) from None

    def iterdir(self) -> list[ObjectPath]:
        base = self.url.partition("://")[0] + "://"
        return sorted(ObjectPath(base + i.path) for i in self._listing(recursive=False))

    def glob(self, pattern: str) -> list[ObjectPath]:
        """Objects (and prefixes) under this one matching `pattern` as pathlib's glob does (no '**')."""
        base = self.url.partition("://")[0] + "://"
        inner = self._fs()[1]
        depth = pattern.count("/") + 1
        found = []
        for i in self._listing(recursive=depth > 1):
            rel = i.path[len(inner) + 1 :]
            if _segments_match(rel, pattern):
                found.append(ObjectPath(base + i.path))
        return sorted(found)

    def rglob(self, pattern: str) -> list[ObjectPath]:
        base = self.url.partition("://")[0] + "://"
        return sorted(
            ObjectPath(base + i.path)
            for i in self._listing(recursive=True)
            if fnmatch.fnmatchcase(i.path.rsplit("/", 1)[-1], pattern)
        )

    # reading and writing whole objects
    def read_bytes(self) -> bytes:
        fs, inner = self._fs()
        try:
            with fs.open_input_stream(inner) as f:
                return f.read()
        except (OSError, ValueError) as e:
            raise _failure(self.url, e) from None

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        with output_stream(self) as f:
            f.write(data)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def unlink(self, missing_ok: bool = False) -> None:
        fs, inner = self._fs()
        try:
            fs.delete_file(inner)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except (OSError, ValueError) as e:
            raise _failure(self.url, e) from None

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to make: a prefix exists once an object is written under it."""


def as_path(path) -> ObjectPath | os.PathLike:
    """A run folder or file as an object to work on: an ObjectPath for an s3:// URL, else a Path."""
    from pathlib import Path

    if isinstance(path, ObjectPath):
        return path
    return ObjectPath(path) if is_url(str(path)) else Path(path)


def parquet_source(path):
    """What pyarrow's Parquet readers take for `path`: a local path as it is, an object opened for
    random access (a reader then fetches only the footer and the column chunks it reads)."""
    if not isinstance(path, ObjectPath):
        return path
    fs, inner = path._fs()
    try:
        return fs.open_input_file(inner)
    except (OSError, ValueError) as e:
        raise _failure(path.url, e) from None


class output_stream:
    """A stream writing `path`'s object at its final key: it appears whole when the stream closes
    (S3 completes the upload then; a killed process completes nothing). An error while writing
    removes what its close would have made visible, so no partial object stays at the key."""

    def __init__(self, path: ObjectPath):
        self.path = path

    def __enter__(self):
        fs, inner = self.path._fs()
        try:
            self.stream = fs.open_output_stream(inner)
        except (OSError, ValueError) as e:
            raise _failure(self.path.url, e) from None
        return self.stream

    def __exit__(self, kind, error, tb) -> None:
        self.stream.close()  # pyarrow has no abort: an upload is completed by close or by its destructor
        if kind is not None:
            self.path.unlink(missing_ok=True)


def local_twin(run: ObjectPath):
    """A local folder for what a run on object storage keeps on this machine (its logs, the judge's
    verdict cache): TMPDIR/mmpr-runs/s3/BUCKET/PREFIX."""
    from pathlib import Path

    return Path(tempfile.gettempdir()) / "mmpr-runs" / run.url.replace("://", "/")


def remove_tree(path) -> None:
    """A folder and everything under it (a local folder, or every object under a prefix)."""
    if isinstance(path, ObjectPath):
        fs, inner = path._fs()
        if path.is_dir():
            fs.delete_dir_contents(inner, missing_dir_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)
