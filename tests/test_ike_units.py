"""IKE keying without a charon: connections, health, failure reasons, charon settings, and
how compile_desired places IKE peers beside IKE-less ones.

Every value below is what the code must produce for a cevpn-ce configuration in RFC 7951
JSON (the shape the agent's transactions hand over); nothing is mocked.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from nc_agent.dataplane.xfrm import Policy
from nc_agent.desired import (
    GUARD_PRIORITY,
    GUARD_REQID,
    PEER_PRIORITY,
    ConfigProblem,
    compile_desired,
)
from nc_agent.ike.charon import PLUGINS, CharonSettings, render_conf
from nc_agent.ike.connections import (
    Credentials,
    IkeConfigProblem,
    IkePeer,
    credentials,
    ike_peer,
    merge_sa_information,
)
from nc_agent.ike.health import Failure, TunnelHealth
from nc_agent.ike.proposals import ike_proposal
from nc_agent.ike.reasons import NOT_PROVISIONED, failure_reason
from nc_agent.ike.retry import RetryPolicy
from tests.yang_defaults import ce_with_defaults, peer_with_defaults, with_defaults

LOCAL = "192.0.2.1"
REMOTE = "198.51.100.2"
REQID = 0x0CE00001  # 216006657, the first reqid cevpn owns
PSK = "q8Tz0lJ3vN5xYc2WmR7aKp4sHd9eGf1b"
CERT = "-----BEGIN CERTIFICATE-----\nMIIBsiteA\n-----END CERTIFICATE-----\n"
CA_1 = "-----BEGIN CERTIFICATE-----\nMIIBspCA1\n-----END CERTIFICATE-----\n"
CA_2 = "-----BEGIN CERTIFICATE-----\nMIIBspCA2\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nMC4serverkey\n-----END PRIVATE KEY-----\n"
OWN_KEY = "-----BEGIN PRIVATE KEY-----\nMC4agentkey\n-----END PRIVATE KEY-----\n"
NO_CREDS = Credentials()
CERT_CREDS = Credentials(certificate=CERT, private_key=KEY, ca_certificates=(CA_1,))
T = "cevpn-types:"
NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
EXAMPLES = Path(__file__).resolve().parent / "examples" / "valid"


def peer_config(
    name: str = "site-b",
    *,
    remote: str = REMOTE,
    tunnel: dict[str, Any] | None = None,
    ike: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "sp-address": remote,
        "enabled": True,
        "tunnel": tunnel or {"establishment": "permanent", "encapsulation": "transport-ipip"},
        "ike": {"pre-shared-key": PSK} if ike is None else ike,
    }


def make_peer(
    peer: dict[str, Any] | None = None,
    *,
    local: str = LOCAL,
    sa_defaults: dict[str, Any] | None = None,
    creds: Credentials = NO_CREDS,
) -> IkePeer:
    return ike_peer(
        peer_with_defaults(peer or peer_config()),
        local=local,
        reqid=REQID,
        sa_defaults=sa_defaults or {},
        creds=creds,
    )


def child_of(peer: IkePeer) -> dict[str, Any]:
    return peer.vici_connection()[peer.name]["children"][peer.name]


def conn_of(peer: IkePeer) -> dict[str, Any]:
    return peer.vici_connection()[peer.name]


# ------------------------------------------------------------------ connections: load-conn


def test_psk_peer_with_defaults_is_the_whole_load_conn_message() -> None:
    assert make_peer().vici_connection() == {
        "site-b": {
            "version": "2",
            "local_addrs": [LOCAL],
            "remote_addrs": [REMOTE],
            "proposals": ["aes256gcm16-prfsha256-curve25519"],
            "rekey_time": "14400s",
            "reauth_time": "0",
            "dpd_delay": "30s",
            "keyingtries": "1",
            "unique": "no",
            "mobike": "no",
            "local": {"auth": "psk", "id": LOCAL},
            "remote": {"auth": "psk", "id": REMOTE},
            "children": {
                "site-b": {
                    "mode": "transport",
                    "reqid": "216006657",
                    "local_ts": ["192.0.2.1/32[ipencap]"],
                    "remote_ts": ["198.51.100.2/32[ipencap]"],
                    "esp_proposals": ["aes256gcm16-esn"],
                    "rekey_time": "3600s",
                    "life_time": "4200s",
                    "replay_window": "1024",
                    "start_action": "trap",
                    "dpd_action": "trap",
                    "close_action": "trap",
                }
            },
        }
    }


def test_transport_peer_selects_ip_in_ip_between_the_two_sp_addresses() -> None:
    child = child_of(make_peer())
    assert child["mode"] == "transport"
    assert child["local_ts"] == ["192.0.2.1/32[ipencap]"]
    assert child["remote_ts"] == ["198.51.100.2/32[ipencap]"]
    assert "mark_in" not in child
    assert "mark_out" not in child


def test_ipv6_transport_peer_selects_ip_in_ip_between_two_host_prefixes() -> None:
    peer = make_peer(peer_config(remote="2001:db8::2"), local="2001:db8::1")
    child = child_of(peer)
    assert child["local_ts"] == ["2001:db8::1/128[ipencap]"]
    assert child["remote_ts"] == ["2001:db8::2/128[ipencap]"]


def test_tunnel_mode_peer_marks_both_directions_with_its_reqid() -> None:
    peer = make_peer(peer_config(tunnel={"encapsulation": "tunnel-mode"}))
    child = child_of(peer)
    assert child["mode"] == "tunnel"
    assert child["mark_in"] == "216006657"
    assert child["mark_out"] == "216006657"
    assert child["local_ts"] == ["0.0.0.0/0"]
    assert child["remote_ts"] == ["0.0.0.0/0"]


def test_ipv6_tunnel_mode_peer_selects_all_of_ipv6() -> None:
    peer = make_peer(
        peer_config(remote="2001:db8::2", tunnel={"encapsulation": "tunnel-mode"}),
        local="2001:db8::1",
    )
    child = child_of(peer)
    assert child["local_ts"] == ["::/0"]
    assert child["remote_ts"] == ["::/0"]


def test_child_reqid_is_the_peers_cevpn_reqid() -> None:
    assert child_of(make_peer())["reqid"] == "216006657"


@pytest.mark.parametrize("establishment", ["permanent", "traffic-driven"])
@pytest.mark.parametrize("encapsulation", ["transport-ipip", "tunnel-mode"])
def test_every_child_is_a_trap_never_start(establishment: str, encapsulation: str) -> None:
    tunnel = {"establishment": establishment, "encapsulation": encapsulation}
    if establishment == "traffic-driven":
        tunnel["idle-timeout"] = 300
    child = child_of(make_peer(peer_config(tunnel=tunnel)))
    assert (child["start_action"], child["dpd_action"], child["close_action"]) == (
        "trap",
        "trap",
        "trap",
    )


def test_connection_is_ikev2_with_one_keying_try_no_uniqueness_no_mobike_no_reauth() -> None:
    conn = conn_of(make_peer())
    assert conn["version"] == "2"
    assert conn["keyingtries"] == "1"
    assert conn["unique"] == "no"
    assert conn["mobike"] == "no"
    assert conn["reauth_time"] == "0"


def test_connection_and_its_only_child_are_named_after_the_peer() -> None:
    message = make_peer(peer_config("branch-9")).vici_connection()
    assert list(message) == ["branch-9"]
    assert list(message["branch-9"]["children"]) == ["branch-9"]


def test_traffic_driven_peer_gets_inactivity_of_its_idle_timeout() -> None:
    tunnel = {"establishment": "traffic-driven", "idle-timeout": 120}
    peer = make_peer(peer_config(tunnel=tunnel))
    assert peer.permanent is False
    assert child_of(peer)["inactivity"] == "120s"


def test_permanent_peer_has_no_inactivity() -> None:
    tunnel = {"establishment": "permanent", "idle-timeout": 120}
    peer = make_peer(peer_config(tunnel=tunnel))
    assert peer.permanent is True
    assert "inactivity" not in child_of(peer)


def test_absent_establishment_and_encapsulation_mean_permanent_ip_in_ip() -> None:
    peer = make_peer({"name": "site-b", "sp-address": REMOTE, "ike": {"pre-shared-key": PSK}})
    assert (peer.permanent, peer.mode, peer.idle_timeout) == (True, "transport", 0)


def test_byte_lifetimes_are_given_to_charon_only_when_configured() -> None:
    assert "rekey_bytes" not in child_of(make_peer())
    assert "life_bytes" not in child_of(make_peer())
    lifetime = {"soft-bytes": 1_000_000_000, "hard-bytes": 1_200_000_000}
    peer = make_peer(
        peer_config(ike={"pre-shared-key": PSK, "sa-information": {"esp": {"lifetime": lifetime}}})
    )
    child = child_of(peer)
    assert child["rekey_bytes"] == "1000000000"
    assert child["life_bytes"] == "1200000000"


def test_child_life_time_is_never_shorter_than_its_rekey_time() -> None:
    lifetime = {"soft-seconds": 3600, "hard-seconds": 1800}
    peer = make_peer(sa_defaults={"esp": {"lifetime": lifetime}})
    assert child_of(peer)["rekey_time"] == "3600s"
    assert child_of(peer)["life_time"] == "3600s"


def test_dpd_delay_and_replay_window_come_from_the_sa_information() -> None:
    defaults = {"ike": {"dpd": {"delay": 10, "timeout": 40}}, "esp": {"replay-window": 4096}}
    peer = make_peer(sa_defaults=defaults)
    assert conn_of(peer)["dpd_delay"] == "10s"
    assert child_of(peer)["replay_window"] == "4096"
    assert peer.dpd_timeout == 40


# ------------------------------------------------------------------ SA information merge


def test_merge_overrides_value_by_value_and_keeps_the_rest() -> None:
    defaults = {
        "ike": {"lifetime": 14400, "dpd": {"delay": 10, "timeout": 30}},
        "esp": {"lifetime": {"soft-seconds": 3600, "hard-seconds": 4200}},
    }
    own = {"ike": {"dpd": {"delay": 20}}, "esp": {"lifetime": {"soft-seconds": 1800}}}
    assert merge_sa_information(defaults, own) == {
        "ike": {"lifetime": 14400, "dpd": {"delay": 20, "timeout": 30}},
        "esp": {"lifetime": {"soft-seconds": 1800, "hard-seconds": 4200}},
    }


def test_a_peer_proposal_list_replaces_the_default_list_whole() -> None:
    gcm = {"id": 1, "encryption": T + "encr-aes-gcm-16-256", "prf": T + "prf-hmac-sha2-256"}
    cbc = {"id": 2, "encryption": T + "encr-aes-cbc-128", "prf": T + "prf-hmac-sha2-256"}
    chacha = {"id": 1, "encryption": T + "encr-chacha20-poly1305", "prf": T + "prf-hmac-sha2-384"}
    merged = merge_sa_information(
        {"ike": {"proposal": [gcm, cbc]}}, {"ike": {"proposal": [chacha]}}
    )
    assert merged == {"ike": {"proposal": [chacha]}}


def test_merge_leaves_the_defaults_untouched() -> None:
    defaults = {"ike": {"dpd": {"delay": 10, "timeout": 30}}}
    merge_sa_information(defaults, {"ike": {"dpd": {"delay": 99}}})
    assert defaults == {"ike": {"dpd": {"delay": 10, "timeout": 30}}}


def test_peer_proposals_replace_the_defaults_value_by_value() -> None:
    sa_defaults = {
        "ike": {
            "proposal": [
                {
                    "id": 1,
                    "encryption": T + "encr-aes-gcm-16-256",
                    "prf": T + "prf-hmac-sha2-256",
                    "dh-group": T + "curve25519",
                },
                {
                    "id": 2,
                    "encryption": T + "encr-aes-cbc-128",
                    "integrity": T + "auth-hmac-sha2-256-128",
                    "prf": T + "prf-hmac-sha2-256",
                    "dh-group": T + "ecp-256",
                },
            ],
            "lifetime": 7200,
            "dpd": {"delay": 10, "timeout": 30},
        },
        "esp": {
            "proposal": [{"id": 1, "encryption": T + "encr-aes-gcm-16-256"}],
            "lifetime": {"soft-seconds": 3600, "hard-seconds": 4200},
        },
    }
    own = {
        "ike": {
            "proposal": [
                {
                    "id": 1,
                    "encryption": T + "encr-aes-gcm-16-128",
                    "prf": T + "prf-hmac-sha2-384",
                    "dh-group": T + "ecp-384",
                }
            ]
        },
        "esp": {
            "proposal": [
                {
                    "id": 1,
                    "encryption": T + "encr-aes-cbc-256",
                    "integrity": T + "auth-hmac-sha2-512-256",
                    "pfs-group": T + "modp-3072",
                    "esn": False,
                }
            ],
            "lifetime": {"soft-seconds": 1800},
        },
    }
    peer = make_peer(
        peer_config(ike={"pre-shared-key": PSK, "sa-information": own}), sa_defaults=sa_defaults
    )
    assert peer.ike_proposals == ("aes128gcm16-prfsha384-ecp384",)
    assert peer.esp_proposals == ("aes256-sha512-modp3072-noesn",)
    assert peer.ike_lifetime == 7200
    assert (peer.dpd_delay, peer.dpd_timeout) == (10, 30)
    assert (peer.child_soft_seconds, peer.child_hard_seconds) == (1800, 4200)


def test_ce_defaults_proposals_apply_when_the_peer_gives_none() -> None:
    sa_defaults = {
        "ike": {
            "proposal": [
                {
                    "id": 1,
                    "encryption": T + "encr-aes-cbc-128",
                    "integrity": T + "auth-hmac-sha2-256-128",
                    "prf": T + "prf-hmac-sha2-256",
                    "dh-group": T + "ecp-256",
                }
            ]
        }
    }
    peer = make_peer(sa_defaults=sa_defaults)
    assert conn_of(peer)["proposals"] == ["aes128-sha256-prfsha256-ecp256"]
    assert child_of(peer)["esp_proposals"] == ["aes256gcm16-esn"]


# ------------------------------------------------------------------ authentication


def test_psk_peer_authenticates_both_ends_by_psk_with_the_sp_addresses_as_ids() -> None:
    conn = conn_of(make_peer())
    assert conn["local"] == {"auth": "psk", "id": LOCAL}
    assert conn["remote"] == {"auth": "psk", "id": REMOTE}


def test_psk_secret_is_owned_by_both_addresses() -> None:
    assert make_peer().vici_shared_key() == {
        "id": "cevpn-site-b",
        "type": "IKE",
        "data": PSK,
        "owners": [LOCAL, REMOTE],
    }


def test_psk_is_not_in_the_repr() -> None:
    peer = make_peer()
    assert peer.psk == PSK
    assert PSK not in repr(peer)
    assert "site-b" in repr(peer)


def test_private_key_is_not_in_the_repr_of_the_credentials() -> None:
    creds = Credentials(certificate=CERT, private_key=KEY, ca_certificates=(CA_1,))
    assert "MC4serverkey" not in repr(creds)


def test_certificate_peer_authenticates_by_public_key_against_the_ca() -> None:
    ike = {"peer-identity": "CN=site-b,O=acme"}
    peer = make_peer(peer_config(ike=ike), creds=CERT_CREDS)
    conn = conn_of(peer)
    assert peer.uses_certificates is True
    assert conn["local"] == {"auth": "pubkey", "certs": [CERT]}
    assert conn["remote"] == {"auth": "pubkey", "id": "CN=site-b,O=acme", "cacerts": [CA_1]}


def test_certificate_peer_has_no_shared_key() -> None:
    peer = make_peer(peer_config(ike={"peer-identity": "CN=site-b,O=acme"}), creds=CERT_CREDS)
    assert peer.vici_shared_key() is None


def test_psk_peer_carries_no_certificate_material() -> None:
    peer = make_peer(creds=CERT_CREDS)
    assert (peer.own_certificate, peer.ca_certificates, peer.peer_identity) == (None, (), None)


def test_certificate_peer_without_ca_is_refused_with_the_peer_named() -> None:
    creds = Credentials(certificate=CERT, private_key=KEY, ca_certificates=())
    with pytest.raises(IkeConfigProblem) as caught:
        make_peer(peer_config(ike={"peer-identity": "CN=site-b,O=acme"}), creds=creds)
    assert caught.value.peer == "site-b"
    assert str(caught.value) == (
        "Peer site-b authenticates by certificate, but this CE has no certificate or no CA "
        "certificate under ce/certificates."
    )


def test_certificate_peer_without_own_certificate_is_refused() -> None:
    creds = Credentials(certificate=None, private_key=KEY, ca_certificates=(CA_1,))
    with pytest.raises(IkeConfigProblem) as caught:
        make_peer(peer_config(ike={"peer-identity": "CN=site-b,O=acme"}), creds=creds)
    assert caught.value.peer == "site-b"


def test_certificate_peer_without_private_key_is_refused_with_the_peer_named() -> None:
    creds = Credentials(certificate=CERT, private_key=None, ca_certificates=(CA_1,))
    with pytest.raises(IkeConfigProblem) as caught:
        make_peer(peer_config(ike={"peer-identity": "CN=site-b,O=acme"}), creds=creds)
    assert caught.value.peer == "site-b"
    assert str(caught.value) == (
        "Peer site-b authenticates by certificate, but the private key of this CE's "
        "certificate is not available (key-origin 'ce' and the agent has no own key)."
    )


def test_key_origin_ce_uses_the_agents_own_key() -> None:
    ce = {"certificates": {"key-origin": "ce", "certificate": CERT}}
    assert credentials(ce_with_defaults(ce), OWN_KEY).private_key == OWN_KEY


def test_key_origin_ce_without_an_own_key_has_no_private_key() -> None:
    ce = {"certificates": {"key-origin": "ce", "certificate": CERT}}
    assert credentials(ce_with_defaults(ce), None).private_key is None


def test_key_origin_server_uses_the_datastore_key_not_the_agents() -> None:
    ce = {"certificates": {"key-origin": "server", "private-key": KEY, "certificate": CERT}}
    assert credentials(ce_with_defaults(ce), OWN_KEY).private_key == KEY


def test_key_origin_defaults_to_server() -> None:
    ce = {"certificates": {"private-key": KEY, "certificate": CERT}}
    assert credentials(ce_with_defaults(ce), OWN_KEY).private_key == KEY


def test_credentials_keep_the_certificate_and_every_ca_in_order() -> None:
    ce = {
        "certificates": {
            "private-key": KEY,
            "certificate": CERT,
            "ca-certificate": [
                {"name": "sp-root", "certificate": CA_1},
                {"name": "sp-next", "certificate": CA_2},
            ],
        }
    }
    creds = credentials(ce_with_defaults(ce), None)
    assert creds.certificate == CERT
    assert creds.ca_certificates == (CA_1, CA_2)


def test_a_ce_without_certificates_has_empty_credentials() -> None:
    assert credentials(ce_with_defaults({}), OWN_KEY) == Credentials()


# ------------------------------------------------------------------ refused configurations


def test_ike_version_1_is_refused() -> None:
    ike = {"pre-shared-key": PSK, "sa-information": {"ike": {"version": "ikev1"}}}
    with pytest.raises(IkeConfigProblem) as caught:
        make_peer(peer_config(ike=ike))
    assert caught.value.peer == "site-b"
    assert str(caught.value) == (
        "Peer site-b: IKE version ikev1 is not offered; cevpn negotiates IKEv2 only."
    )


def test_ike_version_ikev2_is_accepted() -> None:
    ike = {"pre-shared-key": PSK, "sa-information": {"ike": {"version": "ikev2"}}}
    assert conn_of(make_peer(peer_config(ike=ike)))["version"] == "2"


def test_unknown_transform_is_refused_with_the_peer_named() -> None:
    proposal = {"id": 1, "encryption": T + "encr-des", "dh-group": T + "ecp-256"}
    ike = {"pre-shared-key": PSK, "sa-information": {"ike": {"proposal": [proposal]}}}
    with pytest.raises(IkeConfigProblem) as caught:
        make_peer(peer_config(ike=ike))
    assert caught.value.peer == "site-b"
    assert str(caught.value) == (
        "Peer site-b: no strongSwan encryption algorithm for 'cevpn-types:encr-des'."
    )


def test_cbc_esp_proposal_without_integrity_is_refused() -> None:
    proposal = {"id": 1, "encryption": T + "encr-aes-cbc-256"}
    ike = {"pre-shared-key": PSK, "sa-information": {"esp": {"proposal": [proposal]}}}
    with pytest.raises(IkeConfigProblem) as caught:
        make_peer(peer_config(ike=ike))
    assert str(caught.value) == (
        "Peer site-b: cevpn-types:encr-aes-cbc-256 needs an integrity algorithm."
    )


# ------------------------------------------------------------------ health and retries


def test_first_failure_waits_minimum_wait_then_t1_then_backoff() -> None:
    health = TunnelHealth(permanent=True, policy=RetryPolicy(5, 10, 2.0, 600))
    delays = []
    for n in range(4):
        now = NOW + timedelta(minutes=n)
        health.attempt(now)
        failure = health.failed(now, "the peer did not answer")
        assert failure is not None
        delays.append(failure.delay)
        assert health.next_attempt == now + timedelta(seconds=failure.delay)
        assert failure.raise_alarm is False
    assert delays == [5, 10, 20, 40]
    assert health.failures == 4
    assert health.status == "retrying"


def test_alarm_raised_once_at_the_limit_and_cleared_when_up() -> None:
    health = TunnelHealth(permanent=True, policy=RetryPolicy(5, 10, 2.0, 60))
    results = []
    for n in range(6):
        health.attempt(NOW + timedelta(minutes=n))
        result = health.failed(NOW + timedelta(minutes=n), "refused")
        assert result is not None
        results.append(result)
    assert [r.delay for r in results] == [5, 10, 20, 40, 60, 60]
    assert [r.raise_alarm for r in results] == [False, False, False, False, True, False]
    assert health.status == "failed"
    assert health.alarm is True
    assert health.alarm_raised_at == NOW + timedelta(minutes=4)
    changed, clear = health.up(NOW + timedelta(minutes=10))
    assert (changed, clear) == (True, True)
    assert health.alarm is False
    assert (health.status, health.failures, health.next_attempt) == ("up", 0, None)
    assert health.up(NOW + timedelta(minutes=11)) == (False, False)


def _fail_after_attempt(health: TunnelHealth) -> Failure:
    health.attempt(NOW)
    failure = health.failed(NOW, "refused")
    assert failure is not None
    return failure


def test_alarm_is_raised_again_after_the_tunnel_was_up_in_between() -> None:
    health = TunnelHealth(permanent=True, policy=RetryPolicy(1, 1, 2.0, 1))
    _fail_after_attempt(health)
    assert _fail_after_attempt(health).raise_alarm is True
    health.up(NOW)
    _fail_after_attempt(health)
    assert _fail_after_attempt(health).raise_alarm is True


def test_a_failure_during_the_back_off_is_recorded_but_does_not_move_the_schedule() -> None:
    """A trap-started attempt failing while the agent waits for its next one."""
    health = TunnelHealth(permanent=True, policy=RetryPolicy(5, 10, 2.0, 600))
    first = _fail_after_attempt(health)
    due = health.next_attempt
    assert health.failed(NOW + timedelta(seconds=1), "the peer did not answer") is None
    assert (health.failures, health.next_attempt, first.delay) == (1, due, 5)
    assert health.last_error == "the peer did not answer"


def test_rearming_a_traffic_driven_tunnel_ends_the_back_off() -> None:
    health = TunnelHealth(permanent=False, policy=RetryPolicy(5, 10, 2.0, 600))
    _fail_after_attempt(health)
    health.idle(NOW + timedelta(seconds=5))
    assert (health.status, health.next_attempt) == ("waiting-for-traffic", None)
    assert health.failed(NOW + timedelta(seconds=6), "refused") is not None
    assert health.failures == 2


def test_failure_records_the_reason_and_when() -> None:
    health = TunnelHealth(permanent=True, policy=RetryPolicy())
    health.failed(NOW, "no proposal acceptable")
    assert (health.last_error, health.last_error_at) == ("no proposal acceptable", NOW)
    assert (health.status, health.since) == ("retrying", NOW)


def test_peer_failures_are_recorded_but_not_counted() -> None:
    health = TunnelHealth(permanent=False, policy=RetryPolicy())
    health.peer_failed(NOW, "the peer's attempt failed: no shared key")
    assert health.last_error == "the peer's attempt failed: no shared key"
    assert health.last_error_at == NOW
    assert (health.failures, health.next_attempt, health.status) == (0, None, "down")
    assert health.alarm is False


def test_down_records_the_reason() -> None:
    health = TunnelHealth(permanent=True, policy=RetryPolicy())
    health.up(NOW)
    assert health.established_at == NOW
    later = NOW + timedelta(hours=1)
    assert health.down(later, "dead peer detection: the peer stopped answering") is True
    assert health.status == "down"
    assert health.since == later
    assert health.last_error == "dead peer detection: the peer stopped answering"
    assert health.last_error_at == later
    assert health.established_at is None


def test_down_when_already_down_is_no_status_change() -> None:
    health = TunnelHealth(permanent=True, policy=RetryPolicy())
    assert health.down(NOW, "the SAs were deleted") is False
    assert health.last_error == "the SAs were deleted"


def test_idle_permanent_tunnel_is_connecting() -> None:
    health = TunnelHealth(permanent=True, policy=RetryPolicy())
    assert health.idle(NOW) is True
    assert (health.status, health.since) == ("connecting", NOW)


def test_idle_traffic_driven_tunnel_waits_for_traffic() -> None:
    health = TunnelHealth(permanent=False, policy=RetryPolicy())
    assert health.idle(NOW) is True
    assert health.status == "waiting-for-traffic"
    assert health.idle(NOW + timedelta(seconds=1)) is False
    assert health.since == NOW


def test_an_attempt_clears_the_scheduled_retry() -> None:
    health = TunnelHealth(permanent=True, policy=RetryPolicy())
    health.failed(NOW, "refused")
    assert health.attempt(NOW + timedelta(seconds=5)) is True
    assert (health.status, health.next_attempt) == ("connecting", None)
    assert health.failures == 1


def _refused_as_unknown(health: TunnelHealth, at: datetime) -> Failure:
    health.attempt(at)
    failure = health.failed(at, NOT_PROVISIONED, unprovisioned=True)
    assert failure is not None
    return failure


def test_a_peer_that_does_not_know_this_ce_yet_is_retried_after_minimum_wait() -> None:
    health = TunnelHealth(permanent=True, policy=RetryPolicy(5, 10, 2.0, 600))
    clock = NOW
    delays = []
    for _ in range(4):
        failure = _refused_as_unknown(health, clock)
        delays.append(failure.delay)
        assert health.next_attempt == clock + timedelta(seconds=5)
        clock = health.next_attempt
    assert delays == [5, 5, 5, 5]
    assert (health.failures, health.steps, health.status) == (4, 0, "retrying")


def test_refusals_as_unknown_raise_the_alarm_once_they_have_lasted_the_limit() -> None:
    health = TunnelHealth(permanent=True, policy=RetryPolicy(5, 10, 2.0, 60))
    clock = NOW
    outcomes = []
    while clock <= NOW + timedelta(seconds=75):
        failure = _refused_as_unknown(health, clock)
        outcomes.append(((clock - NOW).total_seconds(), failure.delay, failure.raise_alarm))
        clock += timedelta(seconds=failure.delay)
    assert [o for o in outcomes if o[2]] == [(60.0, 60, True)]
    assert outcomes[-2:] == [(55.0, 5, False), (60.0, 60, True)]
    assert health.status == "failed"


def test_an_ordinary_failure_after_refusals_as_unknown_starts_the_back_off_at_its_first_step() -> (
    None
):
    health = TunnelHealth(permanent=True, policy=RetryPolicy(5, 10, 2.0, 600))
    _refused_as_unknown(health, NOW)
    _refused_as_unknown(health, NOW + timedelta(seconds=5))
    health.attempt(NOW + timedelta(seconds=10))
    failure = health.failed(NOW + timedelta(seconds=10), "the peer did not answer")
    assert failure is not None and failure.delay == 5
    health.attempt(NOW + timedelta(seconds=15))
    failure = health.failed(NOW + timedelta(seconds=15), "the peer did not answer")
    assert failure is not None and failure.delay == 10
    assert (health.failures, health.steps) == (4, 2)


def test_coming_up_ends_a_run_of_refusals_as_unknown() -> None:
    health = TunnelHealth(permanent=True, policy=RetryPolicy(5, 10, 2.0, 60))
    _refused_as_unknown(health, NOW)
    health.up(NOW + timedelta(seconds=50))
    later = NOW + timedelta(seconds=100)
    assert _refused_as_unknown(health, later) == Failure(5, False)
    assert health.failing_since == later


def test_retry_policy_is_the_yang_defaults_when_nothing_is_set() -> None:
    defaults = ce_with_defaults({})["retry-policy"]
    assert RetryPolicy.from_yang(defaults) == RetryPolicy(5.0, 10.0, 2.0, 600.0)


# ------------------------------------------------------------------ failure reasons


def test_reason_names_authentication_failed() -> None:
    messages = [
        "authentication of '192.0.2.1' (myself) with pre-shared key",
        "establishing CHILD_SA site-b{1}",
        "received AUTHENTICATION_FAILED notify error",
    ]
    assert failure_reason(messages) == (
        "the peer refused this CE's authentication (AUTHENTICATION_FAILED): check the "
        "pre-shared key or this CE's certificate"
    )


def test_reason_for_psk_mismatch_on_the_responder() -> None:
    messages = [
        "looking for peer configs matching 198.51.100.2[%any]...192.0.2.1[192.0.2.1]",
        "selected peer config 'site-b'",
        "tried 1 shared key for '198.51.100.2' - '192.0.2.1', but MAC mismatched",
        "peer authentication failed",
        "generating IKE_AUTH response 1 [ N(AUTH_FAILED) ]",
    ]
    assert failure_reason(messages) == (
        "the peer's authentication failed here: its pre-shared key differs from this CE's"
    )


def test_reason_for_a_missing_shared_key() -> None:
    assert failure_reason(["no shared key found for '192.0.2.1' - '198.51.100.2'"]) == (
        "no pre-shared key for this peer's identity"
    )


def test_reason_for_an_untrusted_certificate() -> None:
    messages = ["no trusted RSA public key found for 'CN=site-b, O=acme'"]
    assert failure_reason(messages) == (
        "the peer's certificate was not accepted (untrusted issuer, wrong identity or "
        "expired): check the CA certificates and the peer-identity"
    )


def test_a_refused_ike_sa_init_says_first_that_the_peer_may_not_know_this_ce() -> None:
    """charon answers NO_PROPOSAL_CHOSEN alike when it has no configuration for this CE
    ("no IKE config found for ...") and when the proposals differ."""
    messages = [
        "initiating IKE_SA site-b[1] to 198.51.100.2",
        "received NO_PROPOSAL_CHOSEN notify error",
    ]
    assert failure_reason(messages) == NOT_PROVISIONED
    assert NOT_PROVISIONED.startswith("the peer has no configuration for this CE")
    assert "compare the SA information of both CEs" in NOT_PROVISIONED


def test_a_refused_child_sa_is_an_esp_proposal_mismatch() -> None:
    messages = ["received NO_PROPOSAL_CHOSEN notify, no CHILD_SA built"]
    assert failure_reason(messages) == (
        "no ESP proposal acceptable to both ends (NO_PROPOSAL_CHOSEN for the CHILD_SA): "
        "compare the ESP SA information of both CEs"
    )


def test_proposals_this_ce_found_unacceptable_are_a_mismatch() -> None:
    assert failure_reason(["received proposals unacceptable"]) == (
        "no proposal acceptable to both ends (NO_PROPOSAL_CHOSEN): compare the SA "
        "information of both CEs"
    )


def test_reason_names_ts_unacceptable() -> None:
    assert failure_reason(["received TS_UNACCEPTABLE notify, no CHILD_SA built"]) == (
        "the peer refused the traffic selectors (TS_UNACCEPTABLE): the two ends disagree "
        "on the encapsulation or the addresses"
    )


def test_reason_for_a_peer_that_does_not_know_this_ce() -> None:
    messages = [
        "no matching peer config found",
        "generating IKE_AUTH response 1 [ N(AUTH_FAILED) ]",
    ]
    assert failure_reason(messages) == (
        "the peer has no configuration for this CE (is this CE in its peer list?)"
    )


def test_reason_counts_retransmits() -> None:
    messages = [
        "sending retransmit 5 of request message ID 0, seq 1",
        "giving up after 5 retransmits",
    ]
    assert failure_reason(messages) == "the peer did not answer (5 retransmits)"


def test_reason_for_an_unresponsive_peer_without_a_count() -> None:
    assert failure_reason(["establishing IKE_SA failed, peer not responding"]) == (
        "the peer did not answer"
    )


def test_the_newest_telling_message_gives_the_reason() -> None:
    messages = ["received NO_PROPOSAL_CHOSEN notify error", "received AUTHENTICATION_FAILED"]
    assert failure_reason(messages).startswith("the peer refused this CE's authentication")


def test_unknown_log_falls_back_to_a_failure_line() -> None:
    messages = [
        "initiating IKE_SA site-b[3] to 198.51.100.2",
        "unable to allocate SPIs from kernel: error 22",
        "something odd failed here",
        "IKE_SA site-b[3] state change: CONNECTING => DESTROYING",
    ]
    assert failure_reason(messages) == "something odd failed here"


def test_log_without_any_failure_gives_the_generic_reason() -> None:
    messages = ["initiating IKE_SA site-b[3] to 198.51.100.2", "sending packet"]
    assert failure_reason(messages) == "the negotiation failed (no reason in the IKE daemon's log)"
    assert failure_reason([]) == "the negotiation failed (no reason in the IKE daemon's log)"


def test_reason_keeps_the_retransmit_count_in_charons_own_log_order() -> None:
    # ike_sa.c retransmit(): task manager's "giving up after %d retransmits", then
    # "establishing IKE_SA failed, peer not responding" for an IKE_SA still connecting.
    messages = [
        "sending retransmit 3 of request message ID 0, seq 1",
        "giving up after 3 retransmits",
        "establishing IKE_SA failed, peer not responding",
    ]
    assert failure_reason(messages) == "the peer did not answer (3 retransmits)"


# ------------------------------------------------------------------ charon settings and conf


@pytest.mark.parametrize("timeout", [150, 60, 30, 10])
def test_retransmission_gives_up_after_the_dpd_timeout(timeout: int) -> None:
    settings = CharonSettings.for_dpd_timeout(timeout)
    base, tries = settings.retransmit_base, settings.retransmit_tries
    total = sum(settings.retransmit_timeout * base**i for i in range(tries + 1))
    assert (base, tries) == (1.5, 3)
    assert total == pytest.approx(timeout, abs=0.05)


def test_retransmission_timeout_for_the_default_dpd_timeout_is_rounded_to_hundredths() -> None:
    assert CharonSettings.for_dpd_timeout(150).retransmit_timeout == 18.46


def test_retransmission_timeout_never_goes_below_half_a_second() -> None:
    settings = CharonSettings.for_dpd_timeout(1)
    assert settings.retransmit_timeout == 0.5
    assert settings.retransmit_timeout * sum(1.5**i for i in range(4)) == pytest.approx(4.0625)


def render(settings: CharonSettings | None = None) -> str:
    return render_conf(
        Path("/var/lib/cevpn/ike/charon.log"),
        settings or CharonSettings.for_dpd_timeout(150),
    )


def test_conf_loads_only_the_needed_plugins_and_never_stroke() -> None:
    conf = render()
    lines = [line.strip() for line in conf.splitlines()]
    assert "load_modular = no" in lines
    load = [line for line in lines if line.startswith("load = ")]
    assert load == [
        "load = random nonce aes sha1 sha2 hmac xcbc gcm openssl pem pkcs1 pkcs8 x509 pubkey "
        "constraints revocation kdf kernel-netlink socket-default vici"
    ]
    assert "stroke" not in conf
    assert "stroke" not in PLUGINS.split()


def test_conf_vici_socket_is_under_run() -> None:
    conf = render()
    assert "socket = unix:///run/charon.vici" in conf
    assert "/var/lib/cevpn/ike/run" not in conf


def test_conf_logs_to_its_own_file_at_level_1_and_not_to_syslog() -> None:
    lines = [line.strip() for line in render().splitlines()]
    assert "path = /var/lib/cevpn/ike/charon.log" in lines
    assert "default = 1" in lines
    assert "default = -1" in lines


def test_conf_keeps_packet_by_packet_lines_out_of_the_file() -> None:
    lines = [line.strip() for line in render().splitlines()]
    assert "net = 0" in lines and "enc = 0" in lines


def test_conf_carries_the_retransmission_schedule() -> None:
    lines = [line.strip() for line in render(CharonSettings.for_dpd_timeout(30)).splitlines()]
    assert "retransmit_timeout = 3.69" in lines
    assert "retransmit_base = 1.5" in lines
    assert "retransmit_tries = 3" in lines


def test_conf_leaves_routes_and_virtual_ips_to_the_agent() -> None:
    lines = [line.strip() for line in render().splitlines()]
    assert "install_routes = no" in lines
    assert "install_virtual_ip = no" in lines


def test_every_ike_transform_cevpn_offers_has_its_plugin_loaded() -> None:
    proposal = {
        "encryption": T + "encr-aes-cbc-128",
        "integrity": T + "auth-aes-xcbc-96",
        "prf": T + "prf-aes128-xcbc",
        "dh-group": T + "ecp-256",
    }
    assert ike_proposal(proposal) == "aes128-aesxcbc-prfaesxcbc-ecp256"
    assert "xcbc" in PLUGINS.split()


# ------------------------------------------------------------------ compile_desired


B_REQID, BRANCH_REQID, C_REQID = 0x0CE00001, 0x0CE00002, 0x0CE00003
REQIDS = {"site-b": B_REQID, "branch-9": BRANCH_REQID, "site-c": C_REQID}
C_REMOTE = "203.0.113.3"
GCM_KEY = ":".join(["11"] * 36)


def ikeless_sa(spi: int) -> dict[str, Any]:
    return {
        "spi": spi,
        "encryption-algorithm": T + "encr-aes-gcm-16-256",
        "encryption-key": GCM_KEY,
    }


def ce_config(
    *, sa_defaults: dict[str, Any] | None = None, peers: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    if peers is None:
        peers = [
            peer_config("site-b"),
            peer_config(
                "branch-9",
                remote="198.51.100.9",
                tunnel={
                    "establishment": "traffic-driven",
                    "idle-timeout": 120,
                    "encapsulation": "tunnel-mode",
                    "remote-prefix": ["10.9.0.0/24"],
                },
            ),
            {
                "name": "site-c",
                "sp-address": C_REMOTE,
                "enabled": True,
                "tunnel": {"establishment": "permanent", "encapsulation": "transport-ipip"},
                "ikeless": {
                    "outbound": ikeless_sa(0x1001),
                    "inbound": ikeless_sa(0x2001),
                    "replay-window": 1024,
                    "rekey-grace": 30,
                },
            },
        ]
    return with_defaults(
        {
            "cevpn-ce:ce": {
                "pre-configuration": {"site-id": "site-a", "vpn-id": "acme", "sp-address": LOCAL},
                "sa-defaults": sa_defaults or {},
                "retry-policy": {
                    "minimum-wait": 2,
                    "t1": 3,
                    "backoff-factor": "1.50",
                    "limit": 9,
                },
                "peer": peers,
            }
        }
    )


def esp_defaults(*proposals: dict[str, Any]) -> dict[str, Any]:
    return {"esp": {"proposal": [{"id": i + 1, **p} for i, p in enumerate(proposals)]}}


def test_ike_peer_has_a_tunnel_device_but_no_sas_and_no_policies_of_its_own() -> None:
    desired = compile_desired(ce_config(), REQIDS)
    b = desired.peers["site-b"]
    assert b.tunnel.name == "cvi0001"
    assert b.tunnel.encapsulation == "transport-ipip"
    assert (b.tunnel.local, b.tunnel.remote, b.tunnel.key) == (LOCAL, REMOTE, 0)
    assert (b.outbound, b.inbound, b.policies) == (None, None, ())


def test_ike_peer_carries_its_charon_connection() -> None:
    desired = compile_desired(ce_config(), REQIDS)
    assert set(desired.ike_peers()) == {"site-b", "branch-9"}
    b = desired.ike_peers()["site-b"]
    assert (b.local, b.remote, b.reqid, b.psk) == (LOCAL, REMOTE, B_REQID, PSK)


def test_ike_peer_reqids_are_the_ike_reqids_and_the_ikeless_one_is_not() -> None:
    desired = compile_desired(ce_config(), REQIDS)
    assert desired.ike_reqids() == {B_REQID, BRANCH_REQID}


def test_ip_in_ip_guard_still_exists_with_only_ike_peers() -> None:
    desired = compile_desired(ce_config(peers=[peer_config("site-b")]), REQIDS)
    out_guard = Policy(
        "out",
        "192.0.2.1/32",
        "0.0.0.0/0",
        proto=4,
        priority=GUARD_PRIORITY,
        reqid=GUARD_REQID,
        action="block",
    )
    in_guard = Policy(
        "in",
        "0.0.0.0/0",
        "192.0.2.1/32",
        proto=4,
        priority=GUARD_PRIORITY,
        reqid=GUARD_REQID,
        action="block",
    )
    assert desired.guard == (out_guard, in_guard)
    assert desired.policies() == {out_guard, in_guard}
    assert desired.sas() == set()


def test_ike_peer_mtu_follows_aes_gcm_by_default() -> None:
    desired = compile_desired(ce_config(), REQIDS)
    # 1500 - 20 (outer IPv4) - 37 (ESP: 8 header + 8 IV + 3 padding + 2 trailer + 16 ICV)
    assert desired.peers["site-b"].tunnel.mtu == 1443


def test_ike_peer_mtu_follows_a_first_aes_cbc_sha256_proposal() -> None:
    cbc = {"encryption": T + "encr-aes-cbc-256", "integrity": T + "auth-hmac-sha2-256-128"}
    gcm = {"encryption": T + "encr-aes-gcm-16-256"}
    desired = compile_desired(ce_config(sa_defaults=esp_defaults(cbc, gcm)), REQIDS)
    # 1500 - 20 - 57 (ESP: 8 header + 16 IV + 15 padding + 2 trailer + 16 ICV)
    assert desired.peers["site-b"].tunnel.mtu == 1423


def test_ike_peer_mtu_follows_only_the_first_proposal() -> None:
    cbc = {"encryption": T + "encr-aes-cbc-256", "integrity": T + "auth-hmac-sha2-256-128"}
    gcm = {"encryption": T + "encr-aes-gcm-16-256"}
    desired = compile_desired(ce_config(sa_defaults=esp_defaults(gcm, cbc)), REQIDS)
    assert desired.peers["site-b"].tunnel.mtu == 1443


def test_ike_peer_mtu_follows_the_link_mtu() -> None:
    desired = compile_desired(ce_config(), REQIDS, link_mtu=9000)
    assert desired.peers["site-b"].tunnel.mtu == 8943


def test_configured_tunnel_mtu_wins_for_an_ike_peer() -> None:
    peer = peer_config(tunnel={"encapsulation": "transport-ipip", "mtu": 1400})
    desired = compile_desired(ce_config(peers=[peer]), REQIDS)
    assert desired.peers["site-b"].tunnel.mtu == 1400


def test_tunnel_mode_ike_peer_gets_a_vti_keyed_by_its_reqid() -> None:
    tunnel = compile_desired(ce_config(), REQIDS).peers["branch-9"].tunnel
    assert (tunnel.name, tunnel.encapsulation, tunnel.key) == (
        "cvt0002",
        "tunnel-mode",
        BRANCH_REQID,
    )
    assert tunnel.routes == ("10.9.0.0/24",)


def test_ikeless_peer_beside_an_ike_peer_still_gets_its_sas() -> None:
    desired = compile_desired(ce_config(), REQIDS)
    c = desired.peers["site-c"]
    assert c.ike is None
    assert c.outbound is not None and c.inbound is not None
    assert (c.outbound.src, c.outbound.dst, c.outbound.spi) == (LOCAL, C_REMOTE, 0x1001)
    assert (c.inbound.src, c.inbound.dst, c.inbound.spi) == (C_REMOTE, LOCAL, 0x2001)
    assert c.outbound.reqid == c.inbound.reqid == C_REQID
    assert desired.sas() == {c.outbound, c.inbound}


def test_ikeless_peer_beside_an_ike_peer_still_gets_its_policies() -> None:
    desired = compile_desired(ce_config(), REQIDS)
    out = Policy(
        "out", "192.0.2.1/32", "203.0.113.3/32", proto=4, reqid=C_REQID, priority=PEER_PRIORITY
    )
    into = Policy(
        "in", "203.0.113.3/32", "192.0.2.1/32", proto=4, reqid=C_REQID, priority=PEER_PRIORITY
    )
    assert desired.peers["site-c"].policies == (out, into)
    assert desired.policies() == {out, into, *desired.guard}


def test_disabled_ike_peer_is_not_realised() -> None:
    peer = peer_config("site-b") | {"enabled": False}
    desired = compile_desired(ce_config(peers=[peer]), REQIDS)
    assert desired.peers == {}
    assert desired.ike_reqids() == set()


def test_ike_config_problem_becomes_a_config_problem_naming_the_peer() -> None:
    peer = peer_config(ike={"peer-identity": "CN=site-b,O=acme"})
    with pytest.raises(ConfigProblem) as caught:
        compile_desired(ce_config(peers=[peer]), REQIDS)
    assert caught.value.peer == "site-b"
    assert str(caught.value).startswith("Peer site-b authenticates by certificate")


def test_compile_desired_hands_the_agents_own_key_to_a_key_origin_ce_certificate() -> None:
    config = ce_config(peers=[peer_config(ike={"peer-identity": "CN=site-b,O=acme"})])
    config["cevpn-ce:ce"]["certificates"] = {
        "key-origin": "ce",
        "certificate": CERT,
        "ca-certificate": [{"name": "sp-root", "certificate": CA_1}],
    }
    desired = compile_desired(config, REQIDS, own_key_pem=OWN_KEY)
    assert desired.credentials == Credentials(CERT, OWN_KEY, (CA_1,))
    assert conn_of(desired.ike_peers()["site-b"])["local"] == {"auth": "pubkey", "certs": [CERT]}


def test_compile_desired_reads_the_retry_policy() -> None:
    assert compile_desired(ce_config(), REQIDS).retry == RetryPolicy(2, 3, 1.5, 9)


def test_ce_wide_dpd_applies_to_a_peer_that_sets_none(ce_schema) -> None:
    # ce-site-a.xml: sa-defaults/ike/dpd is delay 10, timeout 30; peer site-b has no
    # sa-information.  The agent compiles the JSON its transactions print, with defaults.
    tree = ce_schema.parse_config_file(EXAMPLES / "ce-site-a.xml")
    config = json.loads(tree.print_mem("json", with_siblings=True, include_implicit_defaults=True))
    ce = config["cevpn-ce:ce"]
    assert ce["sa-defaults"]["ike"]["dpd"] == {"delay": 10, "timeout": 30}
    reqids = {p["name"]: 0x0CE00001 + i for i, p in enumerate(ce["peer"])}
    site_b = compile_desired(config, reqids).ike_peers()["site-b"]
    assert (site_b.dpd_delay, site_b.dpd_timeout) == (10, 30)


def test_a_start_moves_an_oversized_charon_log_aside(tmp_path: Path) -> None:
    from nc_agent.ike.charon import LOG_LIMIT, Charon

    charon = Charon(tmp_path, None)
    charon.dir.mkdir()
    charon.log_file.write_bytes(b"x" * (LOG_LIMIT + 1))
    charon._rotate_log()
    assert not charon.log_file.exists()
    assert (charon.dir / "charon.log.1").stat().st_size == LOG_LIMIT + 1


def test_the_lines_of_one_ike_sa_are_read_back_from_charons_log(tmp_path: Path) -> None:
    from nc_agent.ike.charon import Charon

    charon = Charon(tmp_path, None)
    charon.dir.mkdir()
    charon.log_file.write_text(
        "2026-11-27T08:06:55 16[IKE] <site-2|4> initiating IKE_SA site-2[4] to 198.51.100.6\n"
        "2026-11-27T08:06:55 11[IKE] <14> 198.51.100.6 is initiating an IKE_SA\n"
        "2026-11-27T08:06:55 05[IKE] <site-2|4> received AUTHENTICATION_FAILED notify error\n"
        "2026-11-27T08:06:55 05[IKE] <site-3|44> giving up after 3 retransmits\n"
    )
    assert charon.lines_of("4") == [
        "initiating IKE_SA site-2[4] to 198.51.100.6",
        "received AUTHENTICATION_FAILED notify error",
    ]
    assert charon.lines_of("14") == ["198.51.100.6 is initiating an IKE_SA"]
    assert charon.lines_of("7") == []


def test_an_attempt_started_after_the_peer_brought_the_tunnel_up_leaves_it_up() -> None:
    """Both ends initiate; the peer's negotiation can finish before this CE's attempt starts."""
    health = TunnelHealth(permanent=True, policy=RetryPolicy(5, 10, 2.0, 600))
    now = datetime(2026, 1, 1, tzinfo=UTC)
    health.up(now)
    assert health.attempt(now + timedelta(seconds=1)) is False
    assert health.status == "up"
