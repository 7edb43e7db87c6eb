# One image for the MCP proxy, the director and the operator:
#   mcpool proxy --config /etc/mcpool/config.yaml
#   mcpool director --config /etc/mcpool/director.yaml
#   mcpool operator --all-namespaces
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY operator ./operator
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
# iproute2: `ip mptcp endpoint` for the join-address mechanism; nftables/iptables: the director.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iproute2=6.1.* nftables=1.0.* iptables=1.8.* libnetfilter-queue1=1.0.* \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin mcpool
# Non-root by default; pods add back only the capabilities they need (see manifests/).
USER 10001
EXPOSE 5124 1080 9090
ENTRYPOINT ["mcpool"]
CMD ["proxy", "--config", "/etc/mcpool/config.yaml"]
