#!/usr/bin/env bash
# Build the wheels of one mcpool image: mcpool itself and every dependency of its role, into a
# folder that install-wheels.sh installs from with no index. The Dockerfile's build stage runs
# exactly this, and tests/unit/test_image_build.py runs it on the host, so a build dependency
# the image lacks fails a test rather than a user's `docker build`.
#   scripts/build-wheels.sh proxy|operator OUTDIR
# The proxy role compiles netfilterqueue from source: it needs a C compiler, the C library
# headers, Python's headers and libnetfilter-queue-dev. The operator role compiles nothing.
set -euo pipefail
role=${1:?usage: build-wheels.sh proxy|operator OUTDIR}
out=${2:?usage: build-wheels.sh proxy|operator OUTDIR}
case $role in
  proxy|operator) ;;
  *) echo "build-wheels: unknown role '$role' (proxy or operator)" >&2; exit 2 ;;
esac
src=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
mkdir -p "$out"
"$PYTHON" -m pip wheel --quiet --wheel-dir "$out" "$src[$role]"
