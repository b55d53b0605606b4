"""Fetching one published file over HTTP(S) with the standard library: a progress bar, resume of a partial
download, a SHA-256 check, an atomic rename; and unpacking a .tar.gz into place.

The bytes go to `<file>.part`; a later run continues it with a Range request (and starts over when the
server ignores the range). The digest checked is the catalogue's, else the one the host publishes in its
`X-Linked-Etag` header (Hugging Face); a mismatch removes the download. Only a checked (or uncheckable)
complete file is renamed to its final name, so a file under that name is always whole.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.request
from http.client import HTTPException
from typing import BinaryIO

from tqdm import tqdm

from common.errors import WeightsError

CHUNK = 1 << 20
TIMEOUT_S = 60
USER_AGENT = "argen-download/1 (python urllib)"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class DigestRecorder(urllib.request.HTTPRedirectHandler):
    """Follows redirects as urllib does and keeps the SHA-256 a redirecting host publishes for the file
    (Hugging Face answers `resolve/main/<file>` with a redirect whose X-Linked-Etag is the file's SHA-256)."""

    def __init__(self):
        self.published_sha256: str | None = None

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        etag = (headers.get("X-Linked-Etag") or "").strip('"').lower()
        if SHA256_HEX.fullmatch(etag):
            self.published_sha256 = etag
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(url: str, destination: str, sha256: str | None = None) -> str:
    """Download `url` to `destination` (resuming `<destination>.part`) and check it; returns what was checked:
    "SHA-256 checked" or "no published SHA-256". Any failure is a WeightsError of one line."""
    part = destination + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(destination)), exist_ok=True)
    recorder = DigestRecorder()
    try:
        transfer(url, part, urllib.request.build_opener(recorder), os.path.basename(destination))
    except urllib.error.HTTPError as error:
        raise WeightsError(f"{url}: the server answered HTTP {error.code} {error.reason}; check the address or try "
                           "again later") from None
    except (urllib.error.URLError, HTTPException, OSError) as error:
        reason = getattr(error, "reason", None) or error
        raise WeightsError(f"{url}: download failed ({reason}); run the same command again to resume "
                           f"{part}") from None
    expected = sha256 or recorder.published_sha256
    if expected:
        digest = file_sha256(part)
        if not digest.startswith(expected.lower()):
            os.remove(part)
            raise WeightsError(f"{url}: SHA-256 {digest} does not match the published {expected}; the download was "
                               "removed (a damaged transfer or a changed file): run the command again")
    os.replace(part, destination)
    return "SHA-256 checked" if expected else "no published SHA-256"


def transfer(url: str, part: str, opener: urllib.request.OpenerDirector, label: str) -> None:
    """Append the missing bytes of `url` to `part`, from its current size on (from zero when the server ignores
    the range)."""
    done = os.path.getsize(part) if os.path.isfile(part) else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if done:
        request.add_header("Range", f"bytes={done}-")
    try:
        response = opener.open(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code != 416 or not done:
            raise
        if range_total(error.headers.get("Content-Range")) == done:  # nothing lies past `done`: the part is whole
            return
        os.remove(part)  # longer than the file: not a part of it
        return transfer(url, part, opener, label)
    with response:
        if response.headers.get_content_type() == "text/html":
            raise WeightsError(f"{url}: the server sent a web page instead of the file (a sign-in or a moved "
                               "file?); check the address")
        if done and response.status != 206:  # the range was ignored: the body is the whole file
            done = 0
        length = response.headers.get("Content-Length")
        total = range_total(response.headers.get("Content-Range")) if done else None
        if total is None and length and length.isdigit():
            total = done + int(length)
        with open(part, "ab" if done else "wb") as handle:
            copy(response, handle, total, done, label)
    size = os.path.getsize(part)
    if total is not None and size < total:
        raise WeightsError(f"{url}: the connection closed after {size} of {total} bytes; run the same command again "
                           f"to resume {part}")


def range_total(content_range: str | None) -> int | None:
    """The whole file's size in a Content-Range header (`bytes 100-199/1000`, `bytes */1000`), if it gives one."""
    size = (content_range or "").rpartition("/")[2]
    return int(size) if size.isdigit() else None


def copy(source: BinaryIO, handle: BinaryIO, total: int | None, done: int, label: str) -> None:
    with tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024, desc=label) as bar:
        while chunk := source.read(CHUNK):
            handle.write(chunk)
            bar.update(len(chunk))


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True,
                                          unit_divisor=1024, desc="SHA-256", leave=False) as bar:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def unpack(archive: str, folder: str) -> None:
    """Unpack the .tar.gz `archive` into `folder` (dropping a single top-level folder that holds everything), then
    delete it. Members that would land outside `folder` (absolute paths, `..`, links out) are refused."""
    scratch = os.path.join(folder, f".{os.path.basename(archive)}.unpack")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        with open(archive, "rb") as raw, \
                tqdm.wrapattr(raw, "read", total=os.path.getsize(archive), unit="B", unit_scale=True,
                              unit_divisor=1024, desc=f"unpack {os.path.basename(archive)}") as compressed, \
                tarfile.open(fileobj=compressed, mode="r|gz") as tar:  # read once, in order
            for member in tar:
                tar.extract(member, scratch, filter="data")
    except (tarfile.TarError, OSError, EOFError) as error:
        shutil.rmtree(scratch, ignore_errors=True)
        raise WeightsError(f"{archive}: cannot unpack the archive ({error}); delete it and download again") from None
    entries = os.listdir(scratch)
    top = os.path.join(scratch, entries[0]) if len(entries) == 1 else scratch
    source = top if os.path.isdir(top) else scratch
    for name in os.listdir(source):
        target = os.path.join(folder, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(source, name), target)
    shutil.rmtree(scratch)
    os.remove(archive)
