"""Turning a user's checkpoint argument into a local path.

Accepted forms, tried in this order:
- an existing local file or folder;
- "org/repo/path/in/repo.safetensors": one file of a Hub repo (`hf_hub_download`);
- "org/repo" or "org/repo/sub/folder": the *.safetensors and *.json files of the repo (or of
  that folder in it) via `snapshot_download`; the local folder is returned.
huggingface_hub is imported only when a download is needed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import CheckpointError

__all__ = ["parse_hub_path", "resolve_checkpoint"]

# Hub repo owner and name: letters, digits, '-', '_', '.', not starting or ending with '-'/'.'
_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")


def parse_hub_path(spec: str) -> tuple[str, str | None] | None:
    """ "org/repo[/path/in/repo]" -> (repo_id, path in repo or None); None if `spec` cannot be a
    Hub path (absolute or relative-looking paths, '..' components, invalid names)."""
    if not spec or spec.startswith(("/", "./", "../", "~", "\\")) or "\\" in spec or ":" in spec:
        return None
    parts = spec.split("/")
    if len(parts) < 2 or any(p in ("", ".", "..") for p in parts):
        return None
    if not (_NAME.match(parts[0]) and _NAME.match(parts[1])) or "--" in parts[1] or ".." in parts[1]:
        return None
    repo_id = f"{parts[0]}/{parts[1]}"
    return repo_id, "/".join(parts[2:]) or None


def resolve_checkpoint(
    path_or_hub_id: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Returns a local file or folder for a local path or a Hub path (see the module docstring).

    Raises CheckpointError when the argument is neither an existing local path nor a valid Hub
    path, when huggingface_hub is missing, or when the download fails (naming the id).
    """
    local = Path(path_or_hub_id).expanduser()
    if local.exists():
        return local.resolve()
    spec = os.fspath(path_or_hub_id)
    parsed = parse_hub_path(spec)
    if parsed is None:
        raise CheckpointError(
            "not found: no such local file or folder, and not a Hugging Face Hub path "
            "('org/repo', 'org/repo/folder' or 'org/repo/path/file.safetensors')",
            file=spec,
        )
    repo_id, sub = parsed
    try:
        import huggingface_hub
    except ImportError as e:
        raise CheckpointError(
            f"{spec!r} is not a local path; downloading it needs huggingface_hub ({e})", file=spec
        ) from e
    try:
        if sub is not None and sub.endswith((".safetensors", ".json")):
            return Path(
                huggingface_hub.hf_hub_download(repo_id=repo_id, filename=sub, revision=revision, cache_dir=cache_dir)
            )
        patterns = ["*.safetensors", "*.json"] if sub is None else [f"{sub}/*.safetensors", f"{sub}/*.json"]
        root = Path(
            huggingface_hub.snapshot_download(
                repo_id=repo_id, allow_patterns=patterns, revision=revision, cache_dir=cache_dir
            )
        )
    except Exception as e:
        raise CheckpointError(
            f"download from the Hugging Face Hub failed (repo {repo_id!r}"
            f"{'' if sub is None else f', path {sub!r}'}): {type(e).__name__}: {e}",
            file=spec,
        ) from e
    folder = root if sub is None else root / sub
    if not folder.is_dir():
        raise CheckpointError(
            f"the Hub repo {repo_id!r} has no folder {sub!r} with .safetensors/.json files", file=spec
        )
    return folder
