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
