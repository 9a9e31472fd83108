"""Where visiontune keeps what outlives a command: the feature cache (and the header-check record beside it)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_root() -> Path:
    """`$VISIONTUNE_CACHE`, else `$XDG_CACHE_HOME/visiontune`, else `~/.cache/visiontune`."""
    if os.environ.get("VISIONTUNE_CACHE"):
        return Path(os.environ["VISIONTUNE_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "visiontune"


def cache_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """The feature cache a command uses: `cache_dir` when given (`--cache-dir`), else the default."""
    return Path(cache_dir) if cache_dir else default_cache_root()
