"""What an operator sees of the proxy: traces, metrics, logs and the admin HTTP server.

- `telemetry`: OpenTelemetry connection traces and the MPTCP subflow watcher.
- `metrics`: the Prometheus metrics of the data plane.
- `logs`: structured (JSON) log lines, one per closed connection.
- `admin`: `/metrics`, `/healthz`, `/readyz`, `/connections`, `POST /drain`.
- `top`: `mcpool top`, a terminal view of one proxy's connections and subflow rates (admin API).

It observes; it never decides what happens to a connection.
"""
