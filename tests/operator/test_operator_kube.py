"""The operator's own API client over TLS, as in a cluster: one TLS context per client, so aiohttp
reuses its connections (a context made per request meant a TLS handshake per request), made
again when the CA file changes."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import aiohttp.web
from mcpool_operator.kube import Connection, KubeClient, ObjectRef

# A self-signed certificate for IP 127.0.0.1 (EC P-256, valid until 2126) and its key, for the
# test server only.
CERT = """\
-----BEGIN CERTIFICATE-----
MIIBkDCCATagAwIBAgIULlXzsLjtLRJak5Ax18RFhv14VMQwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJMTI3LjAuMC4xMCAXDTI2MTIwMTE5NDkyN1oYDzIxMjYxMTA3
MTk0OTI3WjAUMRIwEAYDVQQDDAkxMjcuMC4wLjEwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAAQJLtY3RAVhVk3ztjucOTeGTkkcZ5cWwRljU0tZeBVrdlTCxQYgYi2A
3aSIvx9fdIhFbmhG0/4spQVtPzD+f1i0o2QwYjAdBgNVHQ4EFgQU5w8pN3JyRKa6
0BUbivVaHc2eOgowHwYDVR0jBBgwFoAU5w8pN3JyRKa60BUbivVaHc2eOgowDwYD
VR0TAQH/BAUwAwEB/zAPBgNVHREECDAGhwR/AAABMAoGCCqGSM49BAMCA0gAMEUC
IEfB/GLXf+pY+pDY8+uGD+bbv56vVCVrxZnfVxrHPX/PAiEA7xkR1VR4clsyDTq/
erMmsBQ03hUKdXnRsuRx40zNnOk=
-----END CERTIFICATE-----
"""
KEY = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgLcaXy0F6iz6DRCs4
1ymMl0yjI3j+RdvsaBT87VoUiq2hRANCAAQJLtY3RAVhVk3ztjucOTeGTkkcZ5cW
wRljU0tZeBVrdlTCxQYgYi2A3aSIvx9fdIhFbmhG0/4spQVtPzD+f1i0
-----END PRIVATE KEY-----
"""


async def test_requests_share_one_tls_connection(tmp_path: Path) -> None:
    cert, key = tmp_path / "ca.crt", tmp_path / "tls.key"
    cert.write_text(CERT)
    key.write_text(KEY)
    peers: list[object] = []

    async def serve(request: aiohttp.web.Request) -> aiohttp.web.Response:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        return aiohttp.web.json_response({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}})

    app = aiohttp.web.Application()
    app.router.add_get("/api/v1/namespaces/ns/configmaps/c", serve)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    client = KubeClient(Connection(server=f"https://127.0.0.1:{port}", token="t", ca_path=str(cert)))
    ref = ObjectRef("v1", "ConfigMap", "ns", "c")
    try:
        for _ in range(5):
            assert (await client.get(ref)) is not None
        assert len(peers) == 5 and len(set(peers)) == 1, peers
        # A new CA file (the cluster's CA rotated): a new context, so a new connection.
        os.utime(cert, ns=(0, 0))
        assert (await client.get(ref)) is not None
        assert len(set(peers)) == 2, peers
    finally:
        await client.close()
        await runner.cleanup()
