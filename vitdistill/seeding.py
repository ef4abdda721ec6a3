"""Seeded model construction that stays reproducible when stages run at once in threads.

``torch.manual_seed`` seeds one generator per process. With ``orchestration.stage_concurrency > 1``
LiT and distillation build their models at the same time in two threads; their draws would interleave
and the initial weights (and a random-init teacher, and so its feature cache) would depend on timing.
Every seeded construction therefore holds one process-wide lock::

    with seeded(0):
        model = timm.create_model(name)
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch

_GLOBAL_RNG = threading.RLock()


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """``torch.manual_seed(seed)``, then the block, with no other seeded block running meanwhile."""
    with _GLOBAL_RNG:
        torch.manual_seed(seed)
        yield
