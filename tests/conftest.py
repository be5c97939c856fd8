"""Shared test helpers: run a worker script under real ``horovodrun --gloo``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Worker scripts run under horovodrun; pytest (with --doctest-modules) must not import them.
collect_ignore_glob = ["workers/*", "torch_workers/*", "tf_workers/*", "user_scripts/*",
                       "reliability_workers/*", "elastic_workers/*", "tune_models/*"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)
HOROVODRUN = os.path.join(VENV_BIN, "horovodrun")


def horovodrun(np: int, args: list, env: dict | None = None, timeout: int = 600,
               extra: list | None = None) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` on ``np`` local workers; fail the test with the output on error."""
    if not os.path.exists(HOROVODRUN):
        pytest.skip("horovodrun is not installed (run `make test`, which sets up .venv)")
    cmd = [HOROVODRUN, "-np", str(np), "-H", f"localhost:{np}", "--gloo", *(extra or []),
           sys.executable, *args]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ALSGD_")}
    full_env.update(TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1",
                    OMP_NUM_THREADS="1")
    full_env.update(env or {})
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        pytest.fail(f"horovodrun exited {proc.returncode}:\n{tail}")
    return proc


def results(proc: subprocess.CompletedProcess, tag: str = "RESULT") -> dict:
    """Collect ``RESULT <name> <json>`` lines printed by workers: {name: [per-rank values]}."""
    out: dict = {}
    for line in proc.stdout.splitlines():
        _, _, line = line.partition(">:") if line.startswith("[") else ("", "", line)
        if line.startswith(tag + " "):
            _, name, payload = line.split(" ", 2)
            out.setdefault(name, []).append(json.loads(payload))
    return out
