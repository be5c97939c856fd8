"""Run one of our programs on local workers under ``horovodrun --gloo``.

Settings travel to the workers in an environment variable, not as flags: horovodrun would
take flags such as ``--config`` or ``--log`` as abbreviations of its own options.

Example (what ``python -m adaptive_lsgd.tools.demo`` does)::

    rc = relaunch("adaptive_lsgd.tools.demo", np=4, settings=vars(args))

and in the worker, ``args = worker_settings(args)`` gives the launcher's settings back.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

SETTINGS_ENV = "_ALSGD_WORKER_SETTINGS"


def relaunch(module: str, np: int, settings: dict) -> int:
    """``horovodrun -np N -H localhost:N --gloo python -m MODULE --worker``; its exit code."""
    horovodrun = shutil.which("horovodrun", path=os.path.dirname(sys.executable)) or "horovodrun"
    cmd = [horovodrun, "-np", str(np), "-H", f"localhost:{np}", "--gloo",
           sys.executable, "-m", module, "--worker"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1",
               **{SETTINGS_ENV: json.dumps(settings)})
    print("[launch] " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)


def worker_settings(args: argparse.Namespace) -> argparse.Namespace:
    """The launcher's settings in a worker (``args`` unchanged when run by hand)."""
    if os.environ.get(SETTINGS_ENV):
        return argparse.Namespace(**json.loads(os.environ[SETTINGS_ENV]))
    return args
