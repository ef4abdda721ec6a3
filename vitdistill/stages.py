"""What each stage reports back: small, JSON-serialisable results (never tensors).

The pipeline's stages, in order, with the stages each one needs first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

STAGES: tuple[str, ...] = ("extract", "probe", "lit", "distill", "evaluate")
DEPENDS_ON: dict[str, tuple[str, ...]] = {
    "extract": (),
    "probe": ("extract",),
    "lit": ("extract",),
    "distill": ("extract",),
    "evaluate": ("extract", "probe", "distill"),
}


@dataclass
class StageResult:
    stage: str
    status: str  # "ok" | "not built" | "disabled" | "failed"
    headline: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stages_to_run(target: str) -> list[str]:
    """``"probe"`` -> ``["extract", "probe"]``; ``"pipeline"`` -> every stage."""
    if target == "pipeline":
        return list(STAGES)
    if target not in DEPENDS_ON:
        raise ValueError(f"unknown stage {target!r}; valid stages: pipeline, {', '.join(STAGES)}")
    order: list[str] = []

    def visit(s: str) -> None:
        for d in DEPENDS_ON[s]:
            visit(d)
        if s not in order:
            order.append(s)

    visit(target)
    return order
