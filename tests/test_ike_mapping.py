"""IKEv2 groundwork: proposals as charon spells them, and the seed 3.4 retry schedule."""

from __future__ import annotations

import pytest

from nc_agent.ike.proposals import (
    DEFAULT_ESP,
    DEFAULT_IKE,
    UnknownTransform,
    esp_proposal,
    ike_proposal,
    proposals,
)
from nc_agent.ike.retry import RetryPolicy
from tests.yang_defaults import esp_proposal_with_defaults


def test_an_aead_ike_proposal_names_no_integrity() -> None:
    p = {
        "encryption": "cevpn-types:encr-aes-gcm-16-256",
        "prf": "cevpn-types:prf-hmac-sha2-384",
        "dh-group": "cevpn-types:ecp-384",
    }
    assert ike_proposal(p) == "aes256gcm16-prfsha384-ecp384"


def test_a_cbc_ike_proposal_carries_its_integrity_algorithm() -> None:
    p = {
        "encryption": "cevpn-types:encr-aes-cbc-256",
        "integrity": "cevpn-types:auth-hmac-sha2-256-128",
        "prf": "cevpn-types:prf-hmac-sha2-256",
        "dh-group": "cevpn-types:modp-3072",
    }
    assert ike_proposal(p) == "aes256-sha256-prfsha256-modp3072"


def test_esp_proposals_say_pfs_and_esn() -> None:
    assert (
        esp_proposal(
            esp_proposal_with_defaults(
                {"encryption": "cevpn-types:encr-chacha20-poly1305", "esn": False}
            )
        )
        == "chacha20poly1305-noesn"
    )
    assert (
        esp_proposal(
            esp_proposal_with_defaults(
                {
                    "encryption": "cevpn-types:encr-aes-gcm-16-128",
                    "pfs-group": "cevpn-types:curve25519",
                }
            )
        )
        == "aes128gcm16-curve25519-esn"
    )


def test_an_unknown_or_incomplete_transform_is_refused_not_guessed() -> None:
    with pytest.raises(UnknownTransform):
        ike_proposal({"encryption": "cevpn-types:encr-des", "dh-group": "cevpn-types:ecp-256"})
    with pytest.raises(UnknownTransform):
        esp_proposal(esp_proposal_with_defaults({"encryption": "cevpn-types:encr-aes-cbc-128"}))


def test_absent_proposal_lists_fall_back_to_the_ce_defaults() -> None:
    assert proposals({}) == ([DEFAULT_IKE], [DEFAULT_ESP])


def test_every_transform_identity_of_the_yang_has_a_keyword() -> None:
    """The tables cover cevpn-types: a new identity without a mapping fails here."""
    from nc_agent.ike import proposals as mapping
    from nc_server.compiler import identity_ancestors

    ancestors = identity_ancestors()
    tables = {
        "encryption-algorithm": mapping.ENCRYPTION,
        "integrity-algorithm": mapping.INTEGRITY,
        "prf-algorithm": mapping.PRF,
        "dh-group": mapping.DH_GROUP,
    }
    checked = 0
    for qualified, bases in ancestors.items():
        name = qualified.split(":", 1)[1]
        for base, table in tables.items():
            if f"cevpn-types:{base}" in bases and name not in (base, "aead-algorithm"):
                assert name in table, f"{name} ({base}) has no strongSwan keyword"
                checked += 1
    assert checked == sum(len(t) for t in tables.values())


def test_the_retry_schedule_follows_seed_3_4() -> None:
    policy = RetryPolicy(minimum_wait=5, t1=10, backoff_factor=2.0, limit=60)
    assert policy.schedule(6) == [5, 10, 20, 40, 60, 60]
    assert [policy.alarm(n) for n in range(1, 7)] == [False, False, False, False, True, True]


def test_the_retry_policy_reads_the_yang_container() -> None:
    policy = RetryPolicy.from_yang(
        {"minimum-wait": 2, "t1": 3, "backoff-factor": "1.50", "limit": 9}
    )
    assert policy.schedule(5) == [2, 3, 4.5, 6.75, 9]
