"""The images' build, exercised without a Docker engine.

The Dockerfile's stages run two scripts: `scripts/build-wheels.sh ROLE DIR` in the build stage
and `scripts/install-wheels.sh ROLE DIR` in each runtime stage. Here the same scripts run on the
host: the wheels are built from this tree (netfilterqueue compiled from source, as in the build
stage) and installed with no package index into clean virtualenvs, one per image. A build
dependency missing from the build stage, a dependency missing from a role's extra, or a data-plane
package leaking into the operator image fails here instead of in a user's `docker build`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def stages() -> dict[str, list[str]]:
    """Instructions of each named stage (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = found.setdefault(match.group(2), [line])
        elif current is not None:
            current.append(line)
    return found


def test_stages_are_build_operator_and_proxy_last() -> None:
    names = list(stages())
    assert names == ["build", "operator", "proxy"], names  # the last is `docker build`'s default


def test_base_image_is_pinned_by_digest() -> None:
    match = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE, re.MULTILINE)
    assert match and re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", match.group(1)), match
    for name, lines in stages().items():
        assert lines[0].split()[1] == "${PYTHON_IMAGE}", f"stage {name} is not built on the pinned base"


def test_compilers_only_in_the_build_stage() -> None:
    for name, lines in stages().items():
        text = " ".join(lines)
        has_compilers = "gcc" in text and "libnetfilter-queue-dev" in text
        assert has_compilers == (name == "build"), f"stage {name}: compilers belong to the build stage only"


def test_stages_run_the_scripts_this_test_runs() -> None:
    found = stages()
    build = " ".join(found["build"])
    for role in ("proxy", "operator"):
        assert f"scripts/build-wheels.sh {role} /wheels/{role}" in build
        runtime = " ".join(found[role])
        assert f"COPY --from=build /wheels/{role} /wheels" in runtime
        assert f"install-wheels.sh {role} /wheels" in runtime
        users = [line.split()[1] for line in found[role] if line.startswith("USER ")]
        assert users and users[-1] not in ("root", "0"), f"stage {role} runs as root"


# --- the real build -----------------------------------------------------------------------------


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, **env}, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def clean_venv(path: Path) -> Path:
    base = getattr(sys, "_base_executable", sys.executable)
    run([base, "-m", "venv", str(path)])
    return path / "bin" / "python"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each role's wheels built and installed into its own clean venv; role -> venv python."""
    work = tmp_path_factory.mktemp("image")
    builder = clean_venv(work / "build-venv")
    installed = {}
    for role in ("proxy", "operator"):
        wheels = work / "wheels" / role
        run([str(ROOT / "scripts" / "build-wheels.sh"), role, str(wheels)], PYTHON=str(builder))
        python = clean_venv(work / role)
        run([str(ROOT / "scripts" / "install-wheels.sh"), role, str(wheels)], PYTHON=str(python))
        installed[role] = python
    return installed


def importable(python: Path, module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    return subprocess.run([str(python), "-c", code], check=False).returncode == 0


def test_proxy_image_has_the_data_plane(images: dict[str, Path]) -> None:
    python = images["proxy"]
    for module in ("mcpool_proxy.server", "netfilterqueue", "pyroute2", "redis", "prometheus_client"):
        assert importable(python, module), f"{module} missing from the proxy image"
    assert not importable(python, "kopf"), "the proxy image carries the operator's kopf"
    mcpool = str(python.parent / "mcpool")
    run([mcpool, "check-config", str(ROOT / "examples" / "lab-proxy.yaml")])
    run([mcpool, "director", "--help"])
    # The compiled extension loads (a wheel built against missing headers would not).
    run([str(python), "-c", "import netfilterqueue; netfilterqueue.NetfilterQueue()"])


def test_operator_image_has_no_data_plane(images: dict[str, Path]) -> None:
    python = images["operator"]
    # prometheus_client serves the operator's own metrics (--metrics-listen).
    assert importable(python, "kopf") and importable(python, "mcpool_operator.main")
    assert importable(python, "prometheus_client")
    for module in ("netfilterqueue", "pyroute2", "redis"):
        assert not importable(python, module), f"{module} leaked into the operator image"
    run([str(python.parent / "mcpool"), "operator", "--help"])
    # The operator renders proxy configuration with the shared model: it must import.
    run([str(python), "-c", "import mcpool_operator.builders, mcpool_operator.crd"])
