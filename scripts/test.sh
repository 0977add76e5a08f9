#!/usr/bin/env bash
# Runs the test suite on 8 fake CPU devices (tests/conftest.py sets them up). Extra args go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# The compile targets' compilers (libtpu, jax's CUDA plugin), once per change of the file: the
# TPU and GPU ahead-of-time tests run with them (about 70 s to install on a fresh machine).
targets_stamp="$venv/.targets-$(sha1sum "$root/requirements-targets.txt" | cut -c1-12)"
if [ ! -f "$targets_stamp" ]; then
  echo "[lcjax] installing the TPU and GPU compilers for the compile-target tests (first run only)"
  python -m pip install --quiet -r "$root/requirements-targets.txt"
  rm -f "$venv"/.targets-*
  touch "$targets_stamp"
fi
exec python -m pytest -n 2 -q --durations=25 "$@" tests
