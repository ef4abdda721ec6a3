"""The pipeline's stages as one registry, and what each stage reports back.

Each :class:`Stage` names the stages it needs, where its task-side body lives (``"tasks.probe:run_stage"``,
imported only when the stage runs, so this module imports neither Prefect nor torch), the config key
that turns it off, the numbers that summarise it in the report, the metrics it logs as curves, and the
example schedule of its deployment. The flows, the deployments, the CLI's stage commands and the
report's stage table are all built from :data:`STAGES`, so a new stage is one ``STAGES.add(Stage(...))``
here plus its task module::

    STAGES.add(Stage("segment", run="tasks.segment:run_stage", needs=("extract",),
                     description="Segmentation probes on the cached patch features.",
                     enabled_key="segment.enabled", headline_keys=("miou",), cron="0 5 * * *",
                     schedule="segmentation probes, nightly at 05:00"))

A stage's body is ``run_stage(config, run_id, upstream) -> StageResult``: ``run_id`` is its MLflow
child run, ``upstream`` the results of the stages it needs, by name.
"""

from __future__ import annotations

import fnmatch
import importlib
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

from vitdistill.errors import ConfigError, VitdistillError, one_line
from vitdistill.registry import Registry

PIPELINE = "pipeline"


@dataclass
class StageResult:
    stage: str
    status: str  # "ok" | "not built" | "disabled" | "failed" | "skipped"
    headline: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None
    message: str = ""
    skipped_because: str | None = None  # "skipped": the failed stage it needed, directly or not
    bad_input: bool = False  # "failed" with a VitdistillError: the input is wrong, not the code (CLI exit 2)
    teacher: str | None = None  # a run with several teachers (teacher.name a list): whose stage this is

    @property
    def label(self) -> str:
        return stage_label(self.stage, self.teacher)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stage_label(stage: str, teacher: str | None) -> str:
    """``probe``, or ``probe[effnet_lite1_imagenet]`` for one teacher's stage of a several-teacher run."""
    return f"{stage}[{teacher}]" if teacher else stage


@dataclass(frozen=True)
class Stage:
    name: str
    run: str  # "module:function" of the body, imported when the stage runs
    description: str  # one line: the CLI's help, the flow's and the deployment's description
    needs: tuple[str, ...] = ()
    enabled_key: str | None = None  # dotted config key of a bool that turns the stage off; None: always on
    # (need, dotted config key): that need is dropped when the key is set (evaluate.student names the student
    # to evaluate, so distillation need not run first)
    needs_unless: tuple[tuple[str, str], ...] = ()
    headline_keys: tuple[str, ...] = ()  # metrics of the report's stage table, in order, when logged
    curves: tuple[str, ...] = ()  # shell-style patterns of the metrics the report redraws as curves
    # (column, metric): what the report's several-teacher table reads from each teacher's run of this stage
    teacher_columns: tuple[tuple[str, str], ...] = ()
    cron: str = "0 2 * * *"  # the deployment's example schedule (created paused)
    schedule: str = ""  # that schedule in words

    def enabled(self, config: Any) -> bool:
        return self.enabled_key is None or bool(_setting(config, self.enabled_key))

    def needed(self, config: Any = None) -> tuple[str, ...]:
        """The stages this one needs under ``config`` (None: all it may need)."""
        dropped = {need for need, key in self.needs_unless if config is not None and _setting(config, key)}
        return tuple(n for n in self.needs if n not in dropped)

    def body(self) -> Callable[..., StageResult]:
        module, _, attr = self.run.partition(":")
        return getattr(importlib.import_module(module), attr)

    def __call__(self, config: Any, run_id: str, upstream: dict[str, dict]) -> StageResult:
        return self.body()(config, run_id, upstream)


def _setting(config: Any, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


class StageRegistry(Registry[StageResult]):
    """The stages in the order they were added; a stage is added after the stages it needs."""

    def add(self, stage: Stage) -> Stage:
        missing = [n for n in stage.needs if n not in self]
        if missing:
            raise ConfigError(f"stage {stage.name!r} needs {', '.join(missing)}, which are not registered; "
                              f"registered: {', '.join(self.names()) or '(none)'}")
        if stage.name == PIPELINE:
            raise ConfigError(f"{PIPELINE!r} names the whole graph; choose another stage name")
        self.register(stage.name)(stage)
        return stage

    def remove(self, name: str) -> None:
        """Drop a stage nothing else needs (tests register toy stages and take them out again)."""
        users = [s.name for s in self if name in s.needs]
        if users:
            raise ConfigError(f"stage {name!r} is needed by {', '.join(users)}")
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        return list(self._entries)

    def list(self, pattern: str = "*") -> list[str]:
        """Registered stage names matching ``pattern``, in registration (pipeline) order."""
        return [n for n in self._entries if fnmatch.fnmatch(n, pattern)]

    def stage(self, name: str) -> Stage:
        return self.get(name)  # type: ignore[return-value]

    def __iter__(self) -> Iterator[Stage]:
        return iter(list(self._entries.values()))  # type: ignore[arg-type]

    def order(self, target: str, config: Any = None) -> list[str]:
        """``"probe"`` -> ``["extract", "probe"]``; ``"pipeline"`` -> every stage, in registration order;
        with ``config``, without the needs it drops (:meth:`Stage.needed`)."""
        if target == PIPELINE:
            return self.names()
        wanted: set[str] = set()

        def visit(name: str) -> None:
            if name not in wanted:
                wanted.add(name)
                for need in self.stage(name).needed(config):
                    visit(need)

        visit(target)
        return [n for n in self.names() if n in wanted]  # registration order is a topological order

    def width(self, names: list[str], config: Any = None) -> int:
        """How many of ``names`` can run at once: the most stages at one depth of the graph."""
        depth: dict[str, int] = {}
        for n in names:
            depth[n] = 1 + max((depth[d] for d in self.stage(n).needed(config) if d in depth), default=-1)
        counts = [list(depth.values()).count(d) for d in set(depth.values())]
        return max(counts, default=1)


STAGES = StageRegistry("stage")

STAGES.add(Stage(
    "extract", run="tasks.extract:run_stage",
    description="Extract teacher features into the sharded webdataset cache (resumes; reuses a finished cache).",
    headline_keys=("samples", "shards", "images_per_s", "skipped_samples"),
    teacher_columns=(("extraction img/s", "images_per_s"),),
    cron="0 1 * * *", schedule="refresh the feature cache, nightly at 01:00"))
STAGES.add(Stage(
    "probe", run="tasks.probe:run_stage", needs=("extract",), enabled_key="probe.enabled",
    description="Linear, few-shot and kNN probes on the cached features (extracts first if needed).",
    headline_keys=("linear_top1", "linear_mean_per_class_recall", "fewshot_10shot_top1", "knn10_top1"),
    teacher_columns=(("probe linear top-1", "linear_top1"), ("best layer", "best_layer"),
                     ("best layer top-1", "best_layer_linear_top1")),
    cron="30 2 * * *", schedule="probes, nightly at 02:30"))
STAGES.add(Stage(
    "lit", run="tasks.lit:run_stage", needs=("extract",), enabled_key="lit.enabled",
    description="LiT: align a text tower to the locked image features; zero-shot and retrieval eval.",
    headline_keys=("zeroshot_top1", "chance_top1", "retrieval_i2t_r1", "retrieval_t2i_r1"), curves=("*",),
    teacher_columns=(("LiT zero-shot top-1", "zeroshot_top1"),),
    cron="0 3 * * 0", schedule="LiT, Sundays at 03:00"))
STAGES.add(Stage(
    "distill", run="tasks.distill:run_stage", needs=("extract",), enabled_key="distill.enabled",
    description="Distil the teacher into a small student, online or from cached teacher outputs.",
    headline_keys=("student_top1", "teacher_top1", "agreement", "student_params", "teacher_params"), curves=("*",),
    teacher_columns=(("parameters", "teacher_params"), ("GFLOPs / image", "teacher_gflops"),
                     ("student top-1", "student_top1"), ("student-teacher agreement", "agreement")),
    cron="0 4 * * 6", schedule="distillation, Saturdays at 04:00"))
STAGES.add(Stage(
    "evaluate", run="tasks.evaluate:run_stage", needs=("extract", "probe", "distill"), enabled_key="evaluate.enabled",
    needs_unless=(("distill", "evaluate.student"),),
    description="Calibration, robustness, subgroup gaps and shape bias for teacher (probe) and student.",
    cron="0 6 * * 6", schedule="evaluations and report, Saturdays at 06:00"))


def stages_to_run(target: str, config: Any = None) -> list[str]:
    """``"probe"`` -> ``["extract", "probe"]``; ``"pipeline"`` -> every stage; ``"evaluate"`` with
    ``evaluate.student`` set -> extract, probe, evaluate (the named student, no distillation first)."""
    return STAGES.order(target, config)


def stage_concurrency(setting: int | str, names: list[str], config: Any = None) -> int:
    """How many stages of ``names`` run at once: ``setting`` when it is a number, else (``"auto"``)
    ``min(width, cpus // 4)`` without a GPU and ``min(width, cpus // 2, 2 * gpus)`` with one, at least 1.

    ``width`` is the most stages the graph can run at once (3: probe, LiT, distillation). On CPU each
    concurrent stage trains with torch's intra-op threads, so a stage gets at least 4 cores (a 2-core
    laptop runs the stages one after another, as before); on a GPU the stages mostly wait on the device,
    so two can share one, each with 2 cores for decoding and data loading."""
    width = STAGES.width(names, config)
    if setting != "auto":
        return max(1, int(setting))
    if width <= 1:  # one stage at a time whatever the machine (and no torch import to count GPUs)
        return 1
    cpus = os.cpu_count() or 1
    gpus = _gpu_count()
    limit = min(cpus // 2, 2 * gpus) if gpus else cpus // 4
    return max(1, min(width, limit))


def _gpu_count() -> int:
    import torch  # here, not at import: the CLI's --help reads the registry without torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def threads_per_stage(concurrency: int) -> int:
    """torch intra-op threads for each of ``concurrency`` stages running at once on this machine's cores,
    so that together they use the cores once rather than each spawning one thread per core."""
    return max(1, (os.cpu_count() or 1) // max(1, concurrency))


def failure_message(e: BaseException) -> str:
    """A failed stage's one line (:func:`vitdistill.errors.one_line`), else its type and first line; URIs masked."""
    from vitdistill.redact import redact_uri

    first = (str(e).strip().splitlines() or [""])[0]
    return redact_uri(one_line(e) or f"{type(e).__name__}: {first}")


class StagesFailed(VitdistillError):
    """Some stages of a flow run failed; ``result`` is the run's summary (every stage's status)."""

    def __init__(self, result: dict) -> None:
        self.result = result
        label = lambda s: stage_label(s["stage"], s.get("teacher"))  # noqa: E731
        failed = [f"{label(s)} failed: {s['message']}" for s in result["stages"] if s["status"] == "failed"]
        skipped = [label(s) for s in result["stages"] if s["status"] == "skipped"]
        super().__init__("; ".join(failed) + (f"; skipped: {', '.join(skipped)}" if skipped else ""))

    def __reduce__(self):  # picklable with its result (Prefect may serialise a flow's exception)
        return (type(self), (self.result,))
