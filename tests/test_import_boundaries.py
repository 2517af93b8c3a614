"""`runtime` stays the leaf: every module under it imports with torch, export and calibration
blocked, and `import runtime` loads no backend (only the module that uses a backend imports it).

Each check runs in a fresh interpreter, so what this test process already imported does not count.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("torch", "export", "calibration")  # STYLE.md: runtime never imports these
BACKENDS = ("onnxruntime", "tensorrt", "cuda")

# Imports every module under runtime/ with FORBIDDEN blocked; prints what failed and why.
IMPORT_ALL = """
import importlib, json, pkgutil, sys
for name in FORBIDDEN:
    sys.modules[name] = None  # any `import torch...` now raises ModuleNotFoundError
try:
    import torch
    raise SystemExit("blocking torch did not work")
except ImportError:
    pass

failures = {}
def record(name, e):
    failures[name] = dict(
        type=type(e).__name__,
        import_error=isinstance(e, ImportError),
        missing=getattr(e, "name", None) or "",
        message=str(e),
    )

import runtime
modules = ["runtime"]
def onerror(name):
    record(name, sys.exc_info()[1])
modules += [m.name for m in pkgutil.walk_packages(runtime.__path__, "runtime.", onerror=onerror)]
for name in modules:
    try:
        importlib.import_module(name)
    except Exception as e:
        record(name, e)
print(json.dumps({"modules": modules, "failures": failures}))
"""

# Records every attempt to import a backend during `import runtime`, even one inside try/except.
IMPORT_PACKAGE = """
import importlib.abc, json, sys
attempted = []
class Recorder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BACKENDS:
            attempted.append(fullname)
        return None  # only record; the ordinary finders do the import
sys.meta_path.insert(0, Recorder())
import runtime
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BACKENDS + FORBIDDEN)
print(json.dumps({"attempted": attempted, "loaded": loaded}))
"""


def _run(code: str) -> dict:
    prelude = f"FORBIDDEN = {FORBIDDEN!r}\nBACKENDS = {BACKENDS!r}\n"
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", prelude + code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_runtime_module_imports_without_torch():
    result = _run(IMPORT_ALL)
    assert result["modules"][0] == "runtime"
    failures = result["failures"]
    needs_forbidden = {
        name: f"{f['type']}: {f['message']}"
        for name, f in failures.items()
        if f["missing"].split(".")[0] in FORBIDDEN or re.search(r"\btorch\b", f["message"])
    }
    assert not needs_forbidden, f"runtime modules that need {FORBIDDEN}: {needs_forbidden}"
    # What else may fail is a module whose optional backend is not installed here.
    broken = {
        name: f"{f['type']}: {f['message']}"
        for name, f in failures.items()
        if not f["import_error"] and f["type"] != "OSError"  # OSError: a backend's shared library
    }
    assert not broken, f"runtime modules that fail to import: {broken}"


def test_import_runtime_loads_no_backend():
    result = _run(IMPORT_PACKAGE)
    assert result["attempted"] == [], f"`import runtime` imports backends: {result['attempted']}"
    assert result["loaded"] == [], f"`import runtime` loaded {result['loaded']}"
