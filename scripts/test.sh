#!/usr/bin/env bash
# Runs the test suite on 8 fake CPU devices (tests/conftest.py sets them up). Extra args go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m pytest -n 2 -q "$@" tests
