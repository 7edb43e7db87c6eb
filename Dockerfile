# mcpool images, one Dockerfile with named stages (`make image` builds both):
#   docker build --target proxy    -t mcpool .           # mcpool proxy | director | check-config
#   docker build --target operator -t mcpool-operator .  # mcpool operator
# The proxy image carries iproute2/nftables/iptables and the director's netfilterqueue; the
# operator image only kopf and the configuration model (no C extension, no sysctls).
# The base is pinned by digest (python:3.11-slim-bookworm); bump the digest and the tag together.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

# --- build: wheels for both roles; compilers and headers live only here -------------------------
FROM ${PYTHON_IMAGE} AS build
# netfilterqueue has no wheels: it compiles against libnetfilter-queue (and libc's headers).
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc=4:12.2.* libc6-dev=2.36-* libnetfilter-queue-dev=1.0.* \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY operator ./operator
COPY scripts/build-wheels.sh scripts/install-wheels.sh ./scripts/
RUN scripts/build-wheels.sh proxy /wheels/proxy \
 && scripts/build-wheels.sh operator /wheels/operator

# --- operator: kopf and the configuration model ---------------------------------------------------
FROM ${PYTHON_IMAGE} AS operator
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
COPY --from=build /wheels/operator /wheels
COPY --from=build /src/scripts/install-wheels.sh /usr/local/bin/install-wheels.sh
RUN install-wheels.sh operator /wheels && rm -rf /wheels /usr/local/bin/install-wheels.sh \
 && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin mcpool
USER 10001
# kopf's liveness endpoint (--liveness).
EXPOSE 8080
ENTRYPOINT ["mcpool"]
CMD ["operator"]

# --- proxy (the default target): data plane and director ----------------------------------------
FROM ${PYTHON_IMAGE} AS proxy
# iproute2: `ip mptcp endpoint` for the join-address mechanism; nftables/iptables and
# libnetfilter-queue1: the director. python3-nftables: libnftables' Python binding (the
# director's token map), shipped only as a Debian package that must match the image's
# libnftables; it is pure Python over ctypes, so that one package is linked into the image's
# Python (not all of Debian's dist-packages), as scripts/install-deps.sh does for the venv.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iproute2=6.1.* nftables=1.0.* iptables=1.8.* libnetfilter-queue1=1.0.* \
      python3-nftables=1.0.* \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s /usr/lib/python3/dist-packages/nftables "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nftables" \
 && python -c 'import nftables'

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
COPY --from=build /wheels/proxy /wheels
COPY --from=build /src/scripts/install-wheels.sh /usr/local/bin/install-wheels.sh
RUN install-wheels.sh proxy /wheels && rm -rf /wheels /usr/local/bin/install-wheels.sh \
 && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin mcpool
# Non-root by default; pods add back only the capabilities they need (NET_ADMIN, see docs).
USER 10001
EXPOSE 5124 1080 9090
ENTRYPOINT ["mcpool"]
CMD ["proxy", "--config", "/etc/mcpool/config.yaml"]
