"""The foundation: the core never imports a framework (nor psutil, which only ``alsgd-tune
profile`` needs); Horovod averages tensors for real with PyTorch and with TensorFlow (separate
processes, never both in one)."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys

import pytest
from conftest import REPO, horovodrun, results

import adaptive_lsgd

BLOCK = """
import importlib, importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'tensorflow', 'horovod', 'keras', 'psutil'):
            raise ImportError('blocked framework import: ' + name)
sys.meta_path.insert(0, Block())
import pkgutil, adaptive_lsgd
mods = [m.name for m in pkgutil.walk_packages(adaptive_lsgd.__path__, 'adaptive_lsgd.')
        if not m.name.startswith(('adaptive_lsgd.integrations', 'adaptive_lsgd.tools'))]
for m in mods:
    importlib.import_module(m)
loaded = sorted(n for n in sys.modules
                if n.split('.')[0] in ('torch', 'tensorflow', 'horovod', 'keras', 'psutil'))
print('IMPORTED', len(mods), 'FRAMEWORKS', loaded)
"""


def test_core_imports_no_framework():
    proc = subprocess.run([sys.executable, "-c", BLOCK], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    core = [m.name for m in pkgutil.walk_packages(adaptive_lsgd.__path__, "adaptive_lsgd.")
            if not m.name.startswith(("adaptive_lsgd.integrations", "adaptive_lsgd.tools"))]
    assert len(core) >= 8  # config, topology, timing, cost_model, policies, scheduler, ...
    assert f"IMPORTED {len(core)} FRAMEWORKS []" in proc.stdout


def test_blocker_catches_a_framework_import():
    """The check above would notice: importing the torch integration under the block fails."""
    code = BLOCK.split("import pkgutil")[0] + "import adaptive_lsgd.integrations.torch\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0 and "blocked framework import" in proc.stderr


def test_integrations_import_under_clean_names():
    import importlib.util

    for name in ("adaptive_lsgd.integrations.torch", "adaptive_lsgd.integrations.tensorflow"):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin.endswith(
            os.path.join("integrations", name.rsplit(".", 1)[1] + ".py"))


@pytest.mark.torch
def test_horovod_torch_averages_tensors():
    proc = horovodrun(2, ["tests/workers/smoke.py", "torch"])
    res = results(proc)["smoke"]
    assert len(res) == 2
    for r in res:
        assert r["framework"] == "torch" and r["size"] == 2
        assert r["average"] == [0.5, 1.5, 2.5]  # mean of rank + [0, 1, 2] over ranks 0 and 1
        assert r["sum"] == [1.0, 3.0, 5.0]


@pytest.mark.tensorflow
def test_horovod_tensorflow_averages_tensors():
    proc = horovodrun(2, ["tests/workers/smoke.py", "tensorflow"])
    res = results(proc)["smoke"]
    assert len(res) == 2
    for r in res:
        assert r["framework"] == "tensorflow" and r["size"] == 2
        assert r["average"] == [0.5, 1.5, 2.5]
        assert r["sum"] == [1.0, 3.0, 5.0]
