"""The library never imports Prefect (style.md: ``vitdistill/`` never imports Prefect or the CLI framework)."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import importlib, json, pkgutil, sys
import vitdistill
offenders, modules = {}, []
for info in pkgutil.walk_packages(vitdistill.__path__, "vitdistill."):
    importlib.import_module(info.name)
    modules.append(info.name)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("prefect", "typer", "vitdistill_cli", "flows", "tasks"))
    if leaked and not offenders:
        offenders[info.name] = leaked[:5]
print(json.dumps({"modules": modules, "offenders": offenders}))
"""


def test_importing_every_vitdistill_module_never_imports_prefect():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(result["modules"]) > 40 and "vitdistill.distill.stage" in result["modules"]
    assert result["offenders"] == {}, f"the first module that pulled Prefect or the CLI in: {result['offenders']}"


CLI_SCRIPT = r"""
import json, sys
from vitdistill_cli.main import app
try:
    app(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "prefect", "mlflow", "timm", "torchvision"})
print(json.dumps({"code": code, "heavy": heavy}))
"""


def test_help_and_config_commands_import_neither_torch_nor_prefect(tmp_path):
    """`--help` and `config show/validate` answer in a fraction of a second: they must not pull torch,
    Prefect or MLflow in (the CLI imports those inside the commands that need them)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  source: shapes\n")
    for argv in (["--help"], ["extract", "--help"], ["config", "show"], ["config", "show", "--flat"],
                 ["config", "validate", "-c", str(cfg)], ["list", "stages"]):
        r = subprocess.run([sys.executable, "-c", CLI_SCRIPT, *argv], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        result = json.loads(r.stdout.strip().splitlines()[-1])
        assert result["code"] in (0, None), (argv, r.stdout[-500:])
        assert result["heavy"] == [], f"`vitdistill {' '.join(argv)}` imported {result['heavy']}"
