"""Rasters over HTTP and in cloud storage: GDAL paths of URLs, GDAL's HTTP settings, and
what may be recorded about a URL.

A scene given as ``https://``, ``s3://``, ``gs://`` or ``az://`` is read through GDAL's
virtual file systems (``/vsicurl/``, ``/vsis3/``, ``/vsigs/``, ``/vsiaz/``): in windows,
fetching only the byte ranges (internal tiles of a Cloud-Optimized GeoTIFF) a read needs.
:func:`configure_gdal` sets GDAL's HTTP settings once in a process that reads remote scenes
(no directory listing on open, retries with back-off, merged and parallel range requests,
HTTP/2 over TLS, a block cache), as environment variables so that worker processes inherit
them; a value the user already set wins. Credentials come only from the environment as
GDAL reads them (AWS_*, GOOGLE_*, AZURE_*) or from the URL the user typed; :func:`redact`
strips user information and query strings (signed-URL tokens) from anything res_unet
records or prints.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request

from res_unet.core.errors import UserError

# URL schemes read remotely and the GDAL virtual file system of each.
REMOTE_SCHEMES = {"http": "/vsicurl/", "https": "/vsicurl/", "s3": "/vsis3/",
                  "gs": "/vsigs/", "az": "/vsiaz/"}

# GDAL's settings for remote reads, set once (environment variables: worker processes
# inherit them; anything the user set first is kept).
GDAL_HTTP_SETTINGS = {
    # Opening a.tif must not list its folder (one request per file, not a bucket listing).
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    # A dropped connection or a 5xx is retried with a doubling delay (GDAL's back-off).
    "GDAL_HTTP_MAX_RETRY": "4",
    "GDAL_HTTP_RETRY_DELAY": "0.5",
    "GDAL_HTTP_TIMEOUT": "60",
    "GDAL_HTTP_CONNECTTIMEOUT": "20",
    # Neighbouring tiles in one request, distant ones in parallel requests.
    "GDAL_HTTP_MULTIRANGE": "YES",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "GDAL_HTTP_VERSION": "2TLS",
    # Downloaded ranges kept in memory, so overlapping windows fetch them once: a small
    # cache per open file, a larger one shared by every URL.
    "VSI_CACHE": "TRUE",
    "VSI_CACHE_SIZE": str(8 * 1024 * 1024),
    "CPL_VSIL_CURL_CACHE_SIZE": str(128 * 1024 * 1024),
}

# The byte limit of a catalogue or list read over HTTP (STAC JSON is small).
MAX_TEXT_BYTES = 32 * 1024 * 1024


class _RedactingFilter(logging.Filter):
    """GDAL's messages as rasterio logs them (a retry names the URL it retries), redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


def configure_gdal() -> None:
    """Set :data:`GDAL_HTTP_SETTINGS` in the environment, leaving any the user set, and
    strip credentials from GDAL's logged messages."""
    for key, value in GDAL_HTTP_SETTINGS.items():
        os.environ.setdefault(key, value)
    logger = logging.getLogger("rasterio._env")
    if not any(isinstance(f, _RedactingFilter) for f in logger.filters):
        logger.addFilter(_RedactingFilter())


def scheme(text: str) -> str | None:
    """The remote scheme of ``text`` (http, https, s3, gs, az), or None."""
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if match and match.group(1).lower() in REMOTE_SCHEMES:
        return match.group(1).lower()
    return None


def is_remote(text: str) -> bool:
    """Whether ``text`` is a remote raster reference: a URL of :data:`REMOTE_SCHEMES` or a
    GDAL network path (``/vsicurl/``, ``/vsis3/``...)."""
    return scheme(text) is not None or text.startswith(tuple(set(REMOTE_SCHEMES.values())))


def is_gdal_path(text: str) -> bool:
    """Whether ``text`` is a GDAL virtual file system path (``/vsi...``)."""
    return text.startswith("/vsi")


def gdal_path(text: str) -> str:
    """The path GDAL opens for a URL (``s3://b/k`` -> ``/vsis3/b/k``, ``https://h/p`` ->
    ``/vsicurl/https://h/p``); local paths and ``/vsi`` paths unchanged."""
    found = scheme(text)
    if found is None:
        return text
    if found in ("http", "https"):
        return REMOTE_SCHEMES[found] + text
    return REMOTE_SCHEMES[found] + text.split("://", 1)[1]


def redact_url(url: str) -> str:
    """``url`` without user information, query string and fragment (where signed URLs and
    basic-auth credentials travel)."""
    prefix = ""
    for vsi in sorted(set(REMOTE_SCHEMES.values())):
        if url.startswith(vsi):
            prefix, url = vsi, url[len(vsi):]
            break
    parts = urllib.parse.urlsplit(url)
    if not parts.scheme:
        return prefix + parts.path
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return prefix + urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


_URL_IN_TEXT = re.compile(r"(?:[A-Za-z][A-Za-z0-9+.-]*://|/vsi[a-z0-9_]+/)[^\s'\"<>]+")


def redact(text: str) -> str:
    """``text`` (a message, a path) with every URL in it redacted (:func:`redact_url`)."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def version_tag(url: str, timeout: float = 20.0) -> str | None:
    """What identifies the version of the file at an HTTP(S) ``url``: its ETag, else its
    Last-Modified and size (a HEAD request), hashed so that no header lands in a record
    verbatim; None for other schemes or when the server says neither."""
    if scheme(url) not in ("http", "https"):
        return None
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            headers = response.headers
    except (urllib.error.URLError, OSError, ValueError):
        return None
    tag = headers.get("ETag") or (
        f"{headers.get('Last-Modified')}/{headers.get('Content-Length')}"
        if headers.get("Last-Modified") else None)
    return None if tag is None else hashlib.sha256(tag.encode()).hexdigest()[:16]


def read_text(location: str, what: str, limit: int = MAX_TEXT_BYTES) -> str:
    """The text at ``location``: an HTTP(S) URL (at most ``limit`` bytes) or a local file.
    Raises UserError naming the (redacted) location and ``what`` it was meant to be."""
    if scheme(location) in ("http", "https"):
        try:
            with urllib.request.urlopen(location, timeout=60) as response:
                data = response.read(limit + 1)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise UserError(f"{redact_url(location)}: cannot fetch the {what} "
                            f"({redact(str(exc))}); check the URL and the network") from None
    elif scheme(location) is not None:
        raise UserError(f"{redact_url(location)}: a {what} must be a local file or an "
                        "http(s) URL; download it, or give its https:// address")
    else:
        try:
            with open(location, "rb") as file:
                data = file.read(limit + 1)
        except OSError as exc:
            raise UserError(f"{location}: cannot read the {what} ({exc.strerror or exc}); "
                            "check the path") from None
    if len(data) > limit:
        raise UserError(f"{redact_url(location)}: the {what} is larger than "
                        f"{limit // 2**20} MB; split it or use a STAC API search")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{redact_url(location)}: the {what} is not UTF-8 text; check "
                        "the file") from None
