#!/usr/bin/env bash
# Set up .venv/ with the verified stack: torch 2.13.0 (CPU), tensorflow-cpu 2.15.1,
# Horovod 0.28.1 built from its sdist (C++17 patch; PyTorch + TensorFlow + Gloo),
# mnist1d, the dev tools and this package (editable). Idempotent: a second run reuses
# .venv and the cached Horovod wheel and takes seconds.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$REPO/.venv"
PY="${PYTHON:-python3.11}"
TORCH_VERSION=2.13.0
TF_VERSION=2.15.1
HOROVOD_VERSION=0.28.1
CACHE_ROOT="${ADAPTIVE_LSGD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/adaptive-lsgd/wheels}"
CACHE="$CACHE_ROOT/horovod-$HOROVOD_VERSION-torch$TORCH_VERSION-tf$TF_VERSION-$(uname -m)"

say() { echo "[bootstrap] $*"; }

# 1. Build prerequisites: a C/C++ compiler, cmake, make and the Python headers.
missing=()
command -v "$PY" >/dev/null || { echo "[bootstrap] error: $PY not found (Python 3.11 is required)" >&2; exit 1; }
command -v gcc >/dev/null || missing+=(gcc)
command -v g++ >/dev/null || missing+=(g++)
command -v cmake >/dev/null || missing+=(cmake)
command -v make >/dev/null || missing+=(make)
inc="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
[ -f "$inc/Python.h" ] || missing+=(python3-dev)
"$PY" -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  say "missing build prerequisites: ${missing[*]}"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing them with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
  else
    echo "[bootstrap] error: install ${missing[*]} with your OS package manager (needs root), then run again" >&2
    exit 1
  fi
fi

# 1b. The multi-host tests (tests/test_multihost.py: horovodrun/alsgd-run over ssh to emulated
# hosts) need an ssh server and client. As root they are installed here; the system's ssh
# service is kept from starting (policy-rc.d): each test starts its own sshds in namespaces.
# Not fatal: without them those tests are skipped with the reason.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
   { [ ! -x /usr/sbin/sshd ] || ! command -v ssh-keygen >/dev/null; }; then
  say "installing openssh-server and openssh-client (its service stays off)"
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
  fi
  apt_ssh() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server openssh-client; }
  apt_ssh || { DEBIAN_FRONTEND=noninteractive apt-get update -q && apt_ssh; } || \
    say "could not install openssh-server: the multi-host tests will be skipped"
  if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

# 2. The virtual environment and the Python stack.
[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PY" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
stack_stamp="$VENV/.stack-$TORCH_VERSION-$TF_VERSION"
if [ ! -f "$stack_stamp" ]; then
  say "installing torch $TORCH_VERSION (CPU), tensorflow-cpu $TF_VERSION and tools"
  "${PIP[@]}" --upgrade "pip<25" "setuptools<70" wheel
  "${PIP[@]}" "torch==$TORCH_VERSION" "tensorflow-cpu==$TF_VERSION" "numpy<2" psutil \
    mnist1d pyyaml cloudpickle packaging \
    pytest pytest-timeout hypothesis ruff matplotlib tqdm jsonschema
  touch "$stack_stamp"
fi

# 3. Horovod, built once from the sdist with the C++17 patch, then cached as a wheel.
if ! "$VENV/bin/python" -c "import horovod, sys; sys.exit(horovod.__version__ != '$HOROVOD_VERSION')" 2>/dev/null; then
  wheel="$(ls "$CACHE"/horovod-*.whl 2>/dev/null | head -n1 || true)"
  if [ -z "$wheel" ]; then
    say "building Horovod $HOROVOD_VERSION from its sdist (several minutes on two cores)"
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    "$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work"
    tar -xzf "$work"/horovod-$HOROVOD_VERSION.tar.gz -C "$work"
    src="$work/horovod-$HOROVOD_VERSION"
    sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    grep -q "CMAKE_CXX_STANDARD 17" "$src/CMakeLists.txt" || { echo "[bootstrap] error: C++17 patch did not apply" >&2; exit 1; }
    mkdir -p "$CACHE"
    ( cd "$src" && HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 \
        HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=GLOO \
        MAKEFLAGS="-j$(nproc)" PATH="$VENV/bin:$PATH" \
        "$VENV/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" . )
    cp "$work"/dist/horovod-*.whl "$CACHE/"
    wheel="$(ls "$CACHE"/horovod-*.whl | head -n1)"
  else
    say "using cached Horovod wheel $wheel"
  fi
  "${PIP[@]}" --no-deps "$wheel"
fi

# 4. This package, editable.
if ! "$VENV/bin/python" -c "import adaptive_lsgd.integrations" 2>/dev/null \
   || [ "$REPO/setup.py" -nt "$VENV/.alsgd-installed" ]; then
  say "installing adaptive-lsgd (editable)"
  "${PIP[@]}" --no-deps --no-build-isolation -e "$REPO"
  touch "$VENV/.alsgd-installed"
fi
say "ready: $VENV"
