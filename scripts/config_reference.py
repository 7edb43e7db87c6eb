"""Print the proxy configuration reference (Markdown table) from the pydantic model.

`python scripts/config_reference.py > docs/configuration.md` regenerates the reference; a test
fails when the committed file differs, so the documentation cannot drift from the model.
"""

from __future__ import annotations

import json
from typing import Any

from mcpool_proxy.config import DEFAULT_DENIED_DESTINATIONS, ProxyConfig
from pydantic import BaseModel


def _rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation: Any = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(_rows(annotation, key + "."))
            continue
        default: Any = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        rows.append((key, json.dumps(default), (field.description or "").replace("|", "\\|")))
    return rows


def render() -> str:
    lines = [
        "# Proxy configuration reference",
        "",
        "Generated from `proxy/mcpool_proxy/config.py` by `scripts/config_reference.py`; do not edit.",
        "Load with `mcpool proxy --config FILE`; check with `mcpool check-config FILE`.",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
    ]
    for key, default, text in _rows(ProxyConfig):
        lines.append(f"| `{key}` | `{default}` | {text} |")
    lines += [
        "",
        "Destinations always refused while `policy.deny_default_destinations` is true, besides the",
        "proxy's own addresses: " + ", ".join(f"`{c}`" for c in DEFAULT_DENIED_DESTINATIONS) + ".",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
