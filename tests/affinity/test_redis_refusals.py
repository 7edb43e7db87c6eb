"""A Redis that answers but refuses us is reported at once, in the server's own words (issue 10).

A new user's first Redis is often in protected mode or has a password the pods lack. redis-py's
`repr()` of the refusal is `server:ResponseError`, so logging with `%r` said nothing useful, and
the pod side, which starts "down", said nothing at all. These tests run a real redis-server that
refuses (wrong password; protected mode) and assert the log lines of the pod registry and the
director name the reason.

Protected mode refuses only clients whose address is not 127.0.0.1/::1; the protected-mode test
therefore runs in an anonymous network namespace (`unshare -n`, no fixed name to collide with
other tests) with the server on a non-loopback address held by `lo`.
"""

from __future__ import annotations

import asyncio
import logging
import textwrap
from pathlib import Path

import pytest
from conftest import RedisServer, free_port, run_unshared
from mcpool_proxy.cluster import RedisRegistry
from mcpool_proxy.cluster.director import Director, DirectorConfig
from mcpool_proxy.cluster.redisconn import redacted_url, redis_error_text
from mcpool_proxy.config import RedisClusterConfig, RedisSentinelConfig, RedisTarget
from redis_ha import ClusterGroup, SentinelGroup
from support import require_command, requires_netns

WRONG_PASSWORD = "invalid username-password pair"
PROTECTED = "DENIED Redis is running in protected mode"


async def _feed_for(director: Director, seconds: float) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(director._feed(), seconds)


def _director(url: str) -> Director:
    return Director(DirectorConfig(vip="198.18.0.10", ports=[5124], redis_url=url, metrics_listen=None))


@pytest.fixture
def password_redis(tmp_path: Path) -> RedisServer:
    require_command("redis-server", "redis-server")
    server = RedisServer(tmp_path, free_port())
    server.start()
    server.cli("CONFIG", "SET", "requirepass", "right-password")
    return server


async def test_wrong_password_is_logged_at_start_with_the_servers_words(
    password_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"redis://:wrong-password@127.0.0.1:{password_redis.port}/0"
    try:
        caplog.set_level(logging.DEBUG)
        registry = RedisRegistry(url, "mtf", "pod-a", "198.18.10.1", heartbeat_ttl_s=1.0)
        await registry.start()
        try:
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("mcpool")]
            assert errors, "nothing logged at start"
            line = errors[0].getMessage()
            assert "unreachable at start" in line and WRONG_PASSWORD in line, line
            assert "wrong-password" not in line and ":***@" in line  # the URL is redacted
            assert not registry.redis_up
        finally:
            await registry.stop()
        caplog.clear()
        await _feed_for(_director(url), 1.0)
        warned = [r.getMessage() for r in caplog.records if r.name == "mcpool.director" and r.levelno >= logging.WARNING]
        assert len(warned) == 1 and WRONG_PASSWORD in warned[0], warned
        assert "server:" not in warned[0]
    finally:
        password_redis.kill()


def test_error_text_and_redaction() -> None:
    from redis.exceptions import ResponseError

    exc = ResponseError(PROTECTED + " because ...")
    assert redis_error_text(exc) == f"ResponseError: {PROTECTED} because ..."
    assert "operation timeout" in redis_error_text(TimeoutError())
    assert redacted_url("redis://:s3cret@r:6379/0") == "redis://:***@r:6379/0"
    assert redacted_url("redis://mcp:s3cret@r:6379/0") == "redis://mcp:***@r:6379/0"
    assert redacted_url("redis://r:6379/0") == "redis://r:6379/0"


_PROTECTED_MODE_PROBE = textwrap.dedent(
    """
    import asyncio, logging, subprocess, sys, tempfile, time
    from mcpool_proxy.cluster import RedisRegistry
    from mcpool_proxy.cluster.director import Director, DirectorConfig

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "addr", "add", "198.18.200.1/32", "dev", "lo"], check=True)
    work = tempfile.mkdtemp()
    server = subprocess.Popen(
        ["redis-server", "--port", "6390", "--bind", "198.18.200.1", "--save", "", "--appendonly", "no",
         "--dir", work, "--protected-mode", "yes"],
        stdout=subprocess.DEVNULL,
    )
    logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(levelname)s %(name)s %(message)s")
    url = "redis://198.18.200.1:6390/0"

    async def main():
        # Wait for the listener (a refusal is an answer too: the server is up).
        deadline = time.monotonic() + 10
        while True:
            try:
                asyncio.get_running_loop()
                reader, writer = await asyncio.open_connection("198.18.200.1", 6390)
                writer.close()
                break
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                await asyncio.sleep(0.02)
        registry = RedisRegistry(url, "mtf", "pod-a", "198.18.10.1", heartbeat_ttl_s=1.0)
        await registry.start()
        await registry.stop()
        director = Director(DirectorConfig(vip="198.18.0.10", ports=[5124], redis_url=url, metrics_listen=None))
        try:
            await asyncio.wait_for(director._feed(), 1.0)
        except TimeoutError:
            pass

    try:
        asyncio.run(main())
    finally:
        server.kill()
    """
)


@requires_netns
def test_protected_mode_is_logged_at_start_with_the_servers_words() -> None:
    require_command("redis-server", "redis-server")
    proc = run_unshared("-c", _PROTECTED_MODE_PROBE)
    lines = proc.stdout.splitlines()
    start = [line for line in lines if line.startswith("ERROR mcpool.affinity") and "unreachable at start" in line]
    assert start and PROTECTED in start[0], proc.stdout
    director = [line for line in lines if line.startswith("WARNING mcpool.director")]
    assert len(director) == 1 and PROTECTED in director[0], proc.stdout
    assert not [line for line in lines if "server:ResponseError" in line], proc.stdout


# --- every mode (issue 13): Sentinel and Cluster refusals reach the log in the server's words too ---


async def _refusal_lines(target: RedisTarget, caplog: pytest.LogCaptureFixture) -> tuple[str, list[str]]:
    """The registry's first error at start, and the director's warnings, against `target`."""
    caplog.set_level(logging.DEBUG)
    registry = RedisRegistry(target, "mtf", "pod-a", "198.18.10.1", heartbeat_ttl_s=1.0)
    await registry.start()
    try:
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("mcpool")]
        assert errors and "unreachable at start" in errors[0], errors
        assert not registry.redis_up
    finally:
        await registry.stop()
    caplog.clear()
    director = Director(DirectorConfig.model_validate({
        "vip": "198.18.0.10", "ports": [5124], "metrics_listen": None,
        "redis_sentinel" if isinstance(target, RedisSentinelConfig) else "redis_cluster": target.model_dump(),
    }))  # fmt: skip
    await _feed_for(director, 1.5)
    warned = [r.getMessage() for r in caplog.records if r.name == "mcpool.director" and r.levelno >= logging.WARNING]
    return errors[0], warned


@pytest.mark.parametrize("wrong", ["data", "sentinel"])
async def test_sentinel_refusals_are_logged_with_the_servers_words(
    wrong: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_command("redis-server", "redis-server")
    group = SentinelGroup(tmp_path, password="data-pass", sentinel_password="sentinel-pass")
    try:
        group.start()
        monkeypatch.setenv("REDIS_PASSWORD", "bad-Pw7" if wrong == "data" else "data-pass")
        monkeypatch.setenv("REDIS_SENTINEL_PASSWORD", "bad-Pw7" if wrong == "sentinel" else "sentinel-pass")
        target = RedisSentinelConfig.model_validate(group.config())
        first, warned = await _refusal_lines(target, caplog)
        assert WRONG_PASSWORD in first and "sentinel mcpool via" in first, first
        assert len(warned) == 1 and WRONG_PASSWORD in warned[0], warned
        for secret in ("bad-Pw7", "data-pass", "sentinel-pass"):  # no password in the log
            assert secret not in first + warned[0], (first, warned)
        if wrong == "sentinel":
            # The sentinels refused, not the primary: each one named, none by a client's repr.
            assert "no sentinel names a primary for 'mcpool'" in first and first.count(WRONG_PASSWORD) == 3, first
            assert "<redis" not in first and "auth:" not in first, first
    finally:
        group.stop()


async def test_cluster_refusal_is_logged_with_the_servers_words(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_command("redis-server", "redis-server")
    require_command("redis-cli", "redis-tools")
    group = ClusterGroup(tmp_path, password="cluster-pass")
    try:
        group.start()
        monkeypatch.setenv("REDIS_PASSWORD", "bad-Pw7")
        first, warned = await _refusal_lines(RedisClusterConfig(addresses=group.addresses), caplog)
        assert WRONG_PASSWORD in first and "cluster via" in first, first
        assert len(warned) == 1 and WRONG_PASSWORD in warned[0], warned
    finally:
        group.stop()
