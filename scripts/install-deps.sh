#!/usr/bin/env bash
# Install what mcpool's demo, tests and benchmarks need on a fresh Debian machine:
# Debian packages (only those missing) and a virtualenv in .venv with the project.
# Idempotent: a second run does (almost) nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(
  iproute2 nftables iptables kmod procps psmisc ethtool   # namespaces, veth, nft, NFQUEUE
  redis-server                                            # affinity table (tests start their own)
  iperf3 curl haproxy                                     # demo, SOCKS5 test, bench
  mptcpize                                                # curl under MPTCP (its own package on Debian 12, not in mptcpd)
  util-linux                                              # taskset, unshare
  libnetfilter-queue-dev gcc                              # netfilterqueue (director) builds against it
  unzip                                                   # scripts/install-helm.sh (chart tests)
  prometheus                                              # dashboards/alerts proof (prometheus, promtool)
  python3-nftables                                        # director token map (libnftables in process)
)

missing=()
for pkg in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "install-deps: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "install-deps: apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The Debian redis-server package starts a system instance; tests start their own on free ports.
# The Debian prometheus package starts a system instance on :9090 (also the proxy's default admin
# port); the tests run their own, so stop and disable that one when it was just installed.
if [[ " ${missing[*]:-} " == *" prometheus "* ]]; then
  systemctl disable --now prometheus >/dev/null 2>&1 || service prometheus stop >/dev/null 2>&1 || true
fi

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.mcpool-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi

# libnftables' Python binding ships only as a Debian package (it must match the system's
# libnftables): link that one package into the venv rather than open all of dist-packages.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sfn /usr/lib/python3/dist-packages/nftables "$site/nftables"
if ! .venv/bin/python -c 'import nftables; nftables.Nftables()' >/dev/null 2>&1; then
  echo "install-deps: python module nftables (Debian package python3-nftables) does not load in .venv" >&2
  exit 1
fi

# Every command the demo, the tests and the benchmarks call, with the package that brings it.
# A package can be installed while its command is not (a renamed or split package: Debian 12
# moved mptcpize out of mptcpd), so check the commands themselves and name what is missing.
REQUIRED_COMMANDS=(
  ip:iproute2 ss:iproute2 tc:iproute2 nft:nftables iptables:iptables ip6tables:iptables
  sysctl:procps taskset:util-linux unshare:util-linux ethtool:ethtool
  redis-server:redis-server redis-cli:redis-tools
  curl:curl mptcpize:mptcpize iperf3:iperf3 haproxy:haproxy unzip:unzip
  prometheus:prometheus promtool:prometheus
)
VENV_COMMANDS=(python pytest ruff mypy hadolint py-spy mcpool)

missing_cmds=()
for entry in "${REQUIRED_COMMANDS[@]}"; do
  cmd=${entry%%:*}
  command -v "$cmd" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 \
    || missing_cmds+=("$cmd (Debian package ${entry#*:})")
done
for cmd in "${VENV_COMMANDS[@]}"; do
  [[ -x .venv/bin/$cmd ]] || missing_cmds+=("$cmd (in .venv, from pyproject.toml's [test] extra)")
done
if ((${#missing_cmds[@]})); then
  printf 'install-deps: missing command: %s\n' "${missing_cmds[@]}" >&2
  exit 1
fi

# Helm 4 and Helm 3 for the chart tests (tests/chart/), in .tools/ (git-ignored).
scripts/install-helm.sh
