"""The user cache folder: where the synthetic data sets and the start-up caches of data sets
whose own folder cannot be written are kept."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$PGNM_FAST_CACHE``, else ``$XDG_CACHE_HOME/pgnm-fast``, else ``~/.cache/pgnm-fast``."""
    if os.environ.get("PGNM_FAST_CACHE"):
        return Path(os.environ["PGNM_FAST_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "pgnm-fast"
