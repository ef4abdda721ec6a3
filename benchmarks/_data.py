"""The benchmarks' one way of naming a data set on the command line: ``shapes`` or ``folder:PATH``."""

from __future__ import annotations


def data_sets(spec: str, num_samples: int) -> list[str]:
    """Config overrides for ``spec``: ``shapes`` (``num_samples`` generated images) or ``folder:PATH``, an
    ImageFolder such as the clip-art set of ``../shared/data/openclipart.sh`` (every image; unreadable
    ones skipped and counted)."""
    if spec == "shapes":
        return ["data.source=shapes", f"data.num_samples={num_samples}"]
    if spec.startswith("folder:"):
        return ["data.source=folder", f"data.path={spec.split(':', 1)[1]}", "data.on_error=skip"]
    raise SystemExit(f"--data {spec!r}: expected shapes or folder:PATH")
