"""Policy decisions: allowed clients, refused destinations (defaults, own addresses, extra CIDRs,
IPv4-mapped IPv6), ports, cookies, SOCKS5 credentials and connection accounting."""

from __future__ import annotations

import ipaddress

import pytest
from mcpool_proxy.config import PolicyConfig
from mcpool_proxy.policy import Policy, local_addresses, normalize_address


def make(**kwargs: object) -> Policy:
    return Policy(PolicyConfig.model_validate(kwargs), own_addresses=["198.18.9.1", "2001:db8:9::1"])


def test_clients_must_be_in_allowed_cpes() -> None:
    policy = make(allowed_cpes=["198.18.0.0/24", "2001:db8:1::/48"])
    assert policy.check_client("198.18.0.7") is None
    assert policy.check_client("::ffff:198.18.0.7") is None  # dual-stack listener view
    assert policy.check_client("2001:db8:1::5") is None
    refusal = policy.check_client("198.18.1.7")
    assert refusal is not None and refusal.reason == "client_not_allowed"
    assert make().check_client("198.18.0.7") is not None  # default: nobody


@pytest.mark.parametrize(
    "dest",
    [
        "127.0.0.1", "127.1.2.3", "169.254.169.254", "0.0.0.0", "224.0.0.1", "::1", "::",
        "fe80::1", "fd00:ec2::254", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
        "198.18.9.1", "::ffff:198.18.9.1", "2001:db8:9::1", "10.96.0.1",
    ],
)
def test_default_refused_destinations(dest: str) -> None:
    policy = make(denied_destinations=["10.96.0.0/12"])
    refusal = policy.check_destination(dest, 443)
    assert refusal is not None and refusal.reason == "destination_denied"


def test_allowed_destinations_and_ports() -> None:
    policy = make(allowed_ports=[80, 443])
    assert policy.check_destination("198.18.1.1", 443) is None
    assert policy.check_destination(ipaddress.ip_address("2001:db8::1"), 80) is None
    refusal = policy.check_destination("198.18.1.1", 22)
    assert refusal is not None and refusal.reason == "port_not_allowed"


def test_defaults_can_be_switched_off_for_labs() -> None:
    policy = make(deny_default_destinations=False, denied_destinations=["127.0.0.3/32"])
    assert policy.check_destination("127.0.0.1", 80) is None
    assert policy.check_destination("198.18.9.1", 80) is None
    assert policy.check_destination("::ffff:127.0.0.3", 80) is not None


def test_limits_global_and_per_client() -> None:
    policy = make(max_connections=3, max_connections_per_cpe=2)
    assert policy.acquire("198.18.0.1") is None
    assert policy.acquire("::ffff:198.18.0.1") is None  # same client
    refusal = policy.acquire("198.18.0.1")
    assert refusal is not None and refusal.reason == "cpe_limit"
    assert policy.acquire("198.18.0.2") is None
    refusal = policy.acquire("198.18.0.3")
    assert refusal is not None and refusal.reason == "global_limit"
    policy.release("198.18.0.1")
    assert policy.connections_of("198.18.0.1") == 1
    assert policy.acquire("198.18.0.3") is None
    for client in ("198.18.0.1", "198.18.0.2", "198.18.0.3", "198.18.0.3"):
        policy.release(client)
    assert policy.active == 0 and policy.connections_of("198.18.0.3") == 0


def test_cookies_and_credentials() -> None:
    policy = make(cookies=["c0ffee"], socks5_users=[{"username": "u", "password": "p"}])
    assert policy.check_cookie(bytes.fromhex("c0ffee")) is None
    assert policy.check_cookie(bytes.fromhex("c0ffee00")) is None  # as padded on the wire
    assert policy.check_cookie(None) is not None
    assert policy.check_cookie(b"nope") is not None
    assert make().check_cookie(None) is None
    assert policy.check_socks5_credentials("u", "p") is None
    assert policy.check_socks5_credentials("u", "x") is not None
    assert policy.check_socks5_credentials("x", "p") is not None


def test_normalize_and_local_addresses() -> None:
    assert normalize_address("::ffff:10.0.0.1") == ipaddress.ip_address("10.0.0.1")
    assert normalize_address("fe80::1%lo") == ipaddress.ip_address("fe80::1")
    assert ipaddress.ip_address("127.0.0.1") in local_addresses()


@pytest.mark.parametrize(
    "destination",
    [
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254 (instance metadata)
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
        "::a9fe:a9fe",  # IPv4-compatible (deprecated) form
    ],
)
def test_ipv6_forms_of_refused_ipv4_destinations_are_refused(destination: str) -> None:
    policy = Policy(PolicyConfig(allowed_cpes=["198.18.0.0/15"]), own_addresses=[])
    refusal = policy.check_destination(destination, 443)
    assert refusal is not None and refusal.reason == "destination_denied"


def test_nat64_of_a_public_address_is_allowed() -> None:
    policy = Policy(PolicyConfig(allowed_cpes=["198.18.0.0/15"]), own_addresses=[])
    assert policy.check_destination("64:ff9b::c633:6401", 443) is None  # 198.51.100.1


# --- inside a cluster: private and shared ranges refused by default (issue 10) -------------------


@pytest.mark.parametrize(
    "dest",
    [
        "10.0.0.1", "10.255.255.254", "172.16.0.1", "172.31.255.1", "192.168.1.1", "100.64.0.1",
        "100.127.255.1", "fc00::1", "fd12:3456::1", "64:ff9b:1::a00:1", "::ffff:10.0.0.1",
        # NAT64 (64:ff9b::/96) and 6to4 (2002::/16) forms of 10.1.2.3 and 192.168.0.1
        "64:ff9b::a01:203", "2002:a01:203::1", "64:ff9b::c0a8:1", "2002:c0a8:1::1",
    ],
)
def test_private_and_shared_ranges_are_refused_by_default(dest: str) -> None:
    refusal = make().check_destination(dest, 10250)
    assert refusal is not None and refusal.reason == "destination_denied", dest


@pytest.mark.parametrize("dest", ["172.15.255.255", "172.32.0.1", "100.63.255.255", "100.128.0.1", "fe00::1", "11.0.0.1"])
def test_neighbours_of_private_ranges_stay_open(dest: str) -> None:
    assert make().check_destination(dest, 443) is None


def test_allowed_destinations_open_a_refused_range_on_purpose() -> None:
    policy = make(allowed_destinations=["10.0.0.0/8", "fd00:1::/32"])
    assert policy.check_destination("10.1.2.3", 443) is None
    assert policy.check_destination("64:ff9b::a01:203", 443) is None  # its NAT64 form too
    assert policy.check_destination("fd00:1::5", 443) is None
    # Only what is listed: the other private ranges stay refused.
    assert policy.check_destination("192.168.1.1", 443) is not None
    assert policy.check_destination("fd00:2::5", 443) is not None


def test_a_more_specific_refused_range_wins_over_a_broader_allow() -> None:
    # The operator renders the cluster's ranges into denied_destinations: opening 10/8 for a
    # customer network must not open the Service range inside it.
    policy = make(allowed_destinations=["10.0.0.0/8"], denied_destinations=["10.96.0.0/12"])
    assert policy.check_destination("10.1.2.3", 443) is None
    refusal = policy.check_destination("10.96.0.1", 443)
    assert refusal is not None and "10.96.0.0/12" in refusal.detail


def test_a_more_specific_allow_wins_over_a_broader_refused_range() -> None:
    policy = make(allowed_destinations=["10.96.5.0/24"], denied_destinations=["10.96.0.0/12"])
    assert policy.check_destination("10.96.5.9", 443) is None
    assert policy.check_destination("10.96.6.9", 443) is not None
    assert policy.check_destination("10.1.2.3", 443) is not None  # the default 10/8 still applies


def test_an_equally_specific_allow_wins_and_own_addresses_need_their_own_entry() -> None:
    policy = make(allowed_destinations=["198.18.0.0/15"], denied_destinations=["198.18.0.0/15"])
    assert policy.check_destination("198.18.3.3", 443) is None
    # The proxy's own address is refused as a /32: a /15 allow does not open it.
    assert policy.check_destination("198.18.9.1", 443) is not None
    assert make(allowed_destinations=["198.18.9.1/32"]).check_destination("198.18.9.1", 443) is None


def test_allowed_destinations_do_not_bypass_allowed_ports() -> None:
    policy = make(allowed_destinations=["10.0.0.0/8"], allowed_ports=[443])
    refusal = policy.check_destination("10.0.0.1", 10250)
    assert refusal is not None and refusal.reason == "port_not_allowed"


def test_allowed_destinations_must_be_cidrs() -> None:
    from mcpool_proxy.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="policy.allowed_destinations"):
        parse_config({"policy": {"allowed_destinations": ["not-a-net"]}})
