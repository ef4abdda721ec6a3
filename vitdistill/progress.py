"""Progress bars for long work (extraction, ingestion, view caches, training loops)."""

from __future__ import annotations

import os
from typing import Any

from tqdm.auto import tqdm


def progress_bar(enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar, off when ``enabled`` is false or the environment says ``TQDM_DISABLE=1``.

    tqdm reads ``TQDM_*`` variables only as defaults, which an explicit ``disable=`` overrides;
    CI and log files set ``TQDM_DISABLE=1`` to keep their output readable.
    """
    off = not enabled or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    return tqdm(disable=off, **kwargs)
