"""pre-delete hook of the mcpool chart: delete every MCPPool while the operator still runs.

Pools carry the operator's finalizer; once the operator is gone nobody removes it and deleting
the pools' namespaces or the CRD hangs. This runs before Helm deletes anything: it deletes the
pools in the watched namespaces (WATCH_NAMESPACES, space-separated; empty: all namespaces), then
waits until the operator has released and removed all of them, or fails after TIMEOUT_SECONDS
naming those left. Runs in the operator's image (the kubernetes client is installed there).
"""

import os
import sys
import time

from kubernetes import client, config
from kubernetes.client.rest import ApiException

GROUP, VERSION, PLURAL = "mcp.mptcp.dev", "v1alpha1", "mcppools"


def pools(api, namespaces):
    found = []
    try:
        if not namespaces:
            found += api.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
        for ns in namespaces:
            found += api.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
    except ApiException as exc:
        if exc.status == 404:  # no CRD (or no namespace): no pools
            return []
        raise
    return [(p["metadata"]["namespace"], p["metadata"]["name"]) for p in found]


def main():
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    api = client.CustomObjectsApi()
    namespaces = os.environ.get("WATCH_NAMESPACES", "").split()
    timeout = float(os.environ.get("TIMEOUT_SECONDS", "240"))
    interval = float(os.environ.get("POLL_SECONDS", "2"))
    left = pools(api, namespaces)
    for ns, name in left:
        print(f"deleting MCPPool {ns}/{name}", flush=True)
        try:
            api.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        except ApiException as exc:
            if exc.status != 404:
                raise
    deadline = time.monotonic() + timeout
    while left:
        if time.monotonic() > deadline:
            names = ", ".join(f"{ns}/{name}" for ns, name in left)
            print(
                f"MCPPools still present after {timeout:.0f}s: {names}. Is the operator running? "
                "See `kubectl describe mcppool` for their finalizers.",
                file=sys.stderr,
            )
            return 1
        time.sleep(interval)  # polling: the hook has no watch permission to wait on
        left = pools(api, namespaces)
    print("every MCPPool is gone", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
