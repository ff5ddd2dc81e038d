"""Probe cards on the Hugging Face Hub: ``hf:OWNER/NAME[@REVISION]`` names a card pushed there (a folder
with ``probe.json``, ``probe.safetensors`` and a ``README.md``). :func:`hub_snapshot` downloads it with
``huggingface_hub.snapshot_download`` (a card already in the local cache is used offline); anything that
stops it (offline, no such repository, no network) is one :class:`HubError` line that names the repository.

Pushing a card (not done by probe-atlas itself)::

    from huggingface_hub import upload_folder
    upload_folder(repo_id="OWNER/NAME", folder_path="cards/my-probe", repo_type="model")
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["HF_PREFIX", "HubError", "hub_snapshot", "is_hub_ref", "parse_hub_ref"]

HF_PREFIX = "hf:"
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


class HubError(ValueError):
    """A card on the Hub could not be fetched (the message is one line)."""


def is_hub_ref(ref: object) -> bool:
    return isinstance(ref, str) and ref.startswith(HF_PREFIX)


def parse_hub_ref(ref: str) -> tuple[str, str | None]:
    """``hf:OWNER/NAME[@REVISION]`` (or ``OWNER/NAME[@REVISION]``) → (repo id, revision)."""
    body = ref[len(HF_PREFIX) :] if ref.startswith(HF_PREFIX) else ref
    repo, _, rev = body.partition("@")
    if not _REPO.fullmatch(repo):
        raise HubError(f"{ref!r}: not a Hub repository (expected hf:OWNER/NAME or hf:OWNER/NAME@REVISION)")
    return repo, rev or None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def hub_snapshot(ref: str, cache_dir: str | Path | None = None) -> Path:
    """The local folder of the card ``ref`` (downloaded, or from the cache); a :class:`HubError` otherwise."""
    repo, rev = parse_hub_ref(ref)
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - a dependency of transformers
        raise HubError(f"hf:{repo}: huggingface_hub is not installed ({e})") from None
    try:
        path = snapshot_download(repo_id=repo, revision=rev, repo_type="model", cache_dir=cache_dir)
    except Exception as e:  # every failure (offline, missing repo, network, auth) becomes one line
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        why = "offline (HF_HUB_OFFLINE is set) and not in the local cache" if offline else "download failed"
        raise HubError(
            f"hf:{repo}: cannot fetch the probe card from the Hugging Face Hub: {why} ({_one_line(e)})"
        ) from None
    return Path(path)
