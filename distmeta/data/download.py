"""Downloading a dataset archive: checksummed, written to a ``.part`` file and renamed only once it
is complete and verified, with progress (size, rate, ETA), and a clear error when offline."""

from __future__ import annotations

import hashlib
import http.client
import time
import urllib.error
import urllib.request
from pathlib import Path

from distmeta.data.shards import ShardError
from distmeta.report import print_now

CHUNK = 1 << 20


class DownloadError(ShardError):
    """A download that failed or did not match its checksum; the message says what to do instead."""


def download(url: str, dest: Path, md5: str, fallback: str, progress=print_now, timeout_s: float = 30.0) -> Path:
    """``url`` -> ``dest``, verified against ``md5``; skipped if ``dest`` already matches.
    ``fallback`` (how to get the data another way) ends every error message."""
    if dest.is_file() and _md5(dest) == md5:
        progress(f"{dest.name}: already downloaded, md5 ok")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest, done, started, shown = hashlib.md5(), 0, time.time(), 0.0
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(part, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0)
            while block := response.read(CHUNK):
                f.write(block)
                digest.update(block)
                done += len(block)
                if time.time() - shown >= 1.0 or done == total:
                    shown = time.time()
                    progress(_progress_line(dest.name, done, total, shown - started))
    except (OSError, http.client.HTTPException) as err:
        part.unlink(missing_ok=True)
        if isinstance(err, urllib.error.HTTPError):
            problem = f"{url} answered HTTP {err.code} ({err.reason}); is the URL right?"
        elif isinstance(err, (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException)):
            problem = f"could not download {url} ({getattr(err, 'reason', err)}); offline?"
        else:  # a local failure: disk full, permissions
            problem = f"could not write {part} ({err})"
        raise DownloadError(f"{problem} {fallback}") from None
    if total and done != total:  # the connection closed early: http.client's read() does not say
        part.unlink()
        raise DownloadError(
            f"{url}: the connection ended after {done:,} of its {total:,} bytes; try again, or {fallback}"
        )
    if digest.hexdigest() != md5:
        part.unlink()
        raise DownloadError(
            f"{url} downloaded with md5 {digest.hexdigest()}, expected {md5}: corrupted in transit or changed "
            f"upstream; try again, or {fallback}"
        )
    part.rename(dest)
    return dest


def _progress_line(name: str, done: int, total: int, seconds: float) -> str:
    rate = done / seconds if seconds > 0 else 0.0
    line = f"{name}: {done / 1e6:.1f}"
    if total:
        eta = (total - done) / rate if rate else 0.0
        line += f"/{total / 1e6:.1f} MB, {rate / 1e6:.1f} MB/s, ETA {eta:.0f}s"
    else:
        line += f" MB, {rate / 1e6:.1f} MB/s"
    return line


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()
