"""hf:// sources from the Hugging Face Hub (or a mirror: hf_endpoint), through its file API:

    HEAD {endpoint}/{repo}/resolve/{revision}/{path}       the commit (X-Repo-Commit), size and ETag of a file
    GET  {endpoint}/api/models/{repo}/revision/{revision}  the commit and the files of a whole repo
    GET  {endpoint}/{repo}/resolve/{commit}/{path}         a file's bytes, at that exact commit

The revision (default "main") is resolved to a commit once per fetch and everything is downloaded at
that commit, so a folder never mixes two commits. A whole repo is fetched as a timm model folder: its
config.json and its weights file only (model.safetensors first, as timm prefers), not every file it
holds. A Hub ETag that is a sha256 (an LFS file's) is checked against the bytes; `sha256` pins the file,
or a folder's weights file (as the loader checks it).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from urllib.parse import quote

from serve.errors import CheckpointError
from serve.formats.timm_folder import WEIGHTS_FILES
from serve.sources import web
from serve.sources.address import Address
from serve.sources.cache import SourceCache, key_of, pinned, tree_digest, verified
from serve.sources.transfer import download, retried

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
CACHED_AS = "as cached for the revision's current commit"


def fetch(address: Address, sha256: str | None, cache: SourceCache, settings) -> Path:
    """The cached file or model folder at the revision's current commit, downloaded if not cached.

    Raises: CheckpointError: refused (token, no such repo or file), not a model folder, offline and
        not cached, the download failed, or a sha256 differs.
    """
    what = f"'{address}'"
    source = str(address)
    if sha256 is not None and not address.is_folder and (hit := cache.file(sha256, address.name)) is not None:
        return hit
    ref = cache.ref(source)
    if settings.offline:
        return cache.offline(ref, sha256, what, CACHED_AS)
    hub = _Hub(settings, what)
    revision = quote(address.revision or "main", safe="")
    if address.is_folder:
        commit, files = hub.folder(address.authority, revision)
    else:
        commit, files = hub.file(address.authority, revision, address.path)
    if (entry := cache.current(ref, commit)) is not None:
        return pinned(entry, ref["sha256"], sha256, what, CACHED_AS)
    cache.check_size(sum(size or 0 for size, _ in files.values()), what)
    key = key_of(f"{source}\0{commit}")
    with cache.lock(key):
        if address.is_folder:
            entry, digest = _fetch_folder(hub, address, commit, files, sha256, cache, key)
        else:
            (size, lfs_sha256), = files.values()
            part = cache.partial(key)
            hub.download(address.authority, commit, address.path, part, cache.max_bytes)
            digest = verified(part, sha256, what)
            _check_lfs(digest, lfs_sha256, part, what)
            entry = cache.commit_file(part, digest, address.name)
        cache.write_ref(source, entry, commit, digest)
        return entry


def _fetch_folder(hub: _Hub, address: Address, commit: str, files: dict, sha256: str | None, cache: SourceCache,
                  key: str) -> tuple[Path, str]:
    staged = cache.scratch()
    try:
        digests = {}
        for name, (_, lfs_sha256) in files.items():
            part = cache.partial(key_of(f"{key}\0{name}"))
            hub.download(address.authority, commit, name, part, cache.max_bytes)
            digests[name] = verified(part, None, hub.what)
            _check_lfs(digests[name], lfs_sha256, part, f"{hub.what} file '{name}'")
            os.replace(part, staged / name)
        weights = next(name for name in files if name != "config.json")
        if sha256 is not None and digests[weights] != sha256.lower():
            raise CheckpointError(f"{hub.what}: the sha256 of {weights} is {digests[weights]}, the config expects "
                                  f"{sha256.lower()}; nothing was cached")
        return cache.commit_tree(staged, tree_digest(digests)), digests[weights]
    finally:
        shutil.rmtree(staged, ignore_errors=True)  # gone already once committed


def _check_lfs(digest: str, lfs_sha256: str | None, part: Path, what: str) -> None:
    if lfs_sha256 and digest != lfs_sha256:
        part.unlink(missing_ok=True)
        raise CheckpointError(f"{what}: the bytes' sha256 is {digest}, the Hub says {lfs_sha256}; corrupted")


class _Hub:
    """One Hub endpoint's file API, with the token if one is set."""

    def __init__(self, settings, what: str):
        self.endpoint = settings.hf_endpoint.rstrip("/")
        self.headers = {"Authorization": f"Bearer {settings.hf_token}"} if settings.hf_token else {}
        self.context = web.tls_context(settings.ca_file)
        self.what = what

    def file(self, repo: str, revision: str, path: str) -> tuple[str, dict[str, tuple[int | None, str | None]]]:
        """(commit, {path: (size, LFS sha256)}) from a HEAD on the file (its redirect is not followed)."""
        url = f"{self.endpoint}/{repo}/resolve/{revision}/{quote(path)}"

        def head():
            conn, response = web.request("HEAD", url, self.what, self.context, self.headers, follow=False)
            conn.close()
            if response.status >= 400:
                raise web.refusal(self.what, response)
            return response

        response = retried(head, self.what)
        commit = response.getheader("X-Repo-Commit")
        if not commit:
            raise CheckpointError(f"{self.what}: {self.endpoint} answered without X-Repo-Commit "
                                  "(is hf_endpoint a Hugging Face Hub?)")
        etag = (response.getheader("X-Linked-Etag") or response.getheader("ETag") or "").strip('"').removeprefix('W/"')
        size = response.getheader("X-Linked-Size") or response.getheader("Content-Length")
        return commit, {path: (int(size) if size and size.isdigit() else None, etag if _SHA256.match(etag) else None)}

    def folder(self, repo: str, revision: str) -> tuple[str, dict[str, tuple[int | None, str | None]]]:
        """(commit, {name: (size, LFS sha256)}) of the files a model folder needs: config.json and the weights."""
        url = f"{self.endpoint}/api/models/{repo}/revision/{revision}?blobs=true"
        doc, _ = retried(lambda: web.get_json(url, self.what, self.context, self.headers), self.what)
        siblings = {s.get("rfilename"): s for s in (doc.get("siblings") or []) if isinstance(s, dict)} \
            if isinstance(doc, dict) else {}
        commit = doc.get("sha") if isinstance(doc, dict) else None
        weights = next((name for name in WEIGHTS_FILES if name in siblings), None)
        if not isinstance(commit, str) or "config.json" not in siblings or weights is None:
            raise CheckpointError(f"{self.what}: the repo holds no config.json and weights file ({', '.join(WEIGHTS_FILES)}) "
                                  f"at {revision}: not a timm model folder; name a file instead (hf://org/repo/path)")
        files = {}
        for name in ("config.json", weights):
            entry = siblings[name]
            lfs = entry.get("lfs") if isinstance(entry.get("lfs"), dict) else {}
            size = lfs.get("size", entry.get("size"))
            digest = lfs.get("sha256") or lfs.get("oid")
            files[name] = (size if isinstance(size, int) else None,
                           digest if isinstance(digest, str) and _SHA256.match(digest) else None)
        return commit, files

    def download(self, repo: str, commit: str, path: str, part: Path, limit: int | None) -> None:
        url = f"{self.endpoint}/{repo}/resolve/{commit}/{quote(path)}"
        download(lambda offset: web.open_at(url, offset, self.what, self.context, self.headers), part,
                 self.what, limit)
