#!/usr/bin/env bash
# Install one mcpool role from the wheels build-wheels.sh made, with no package index: what the
# Dockerfile's runtime stages run, and what tests/unit/test_image_build.py runs in a clean venv.
#   scripts/install-wheels.sh proxy|operator WHEELDIR
set -euo pipefail
role=${1:?usage: install-wheels.sh proxy|operator WHEELDIR}
wheels=${2:?usage: install-wheels.sh proxy|operator WHEELDIR}
case $role in
  proxy|operator) ;;
  *) echo "install-wheels: unknown role '$role' (proxy or operator)" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip install --quiet --no-index --find-links "$wheels" "mcpool[$role]"
# Fail the build here, not at a pod's start, if the entry point cannot load its command.
"$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")/mcpool" "$role" --help >/dev/null
