"""The compiler with the server's key store: what changed in the store reaches the CEs.

An incremental compile asks the KeySource only for the pairs its change log names
(``KeyStore.changed_pairs``).  Every way the store's material changes (a rotation, a
rekey step, an operator's key, a dry run's keys that were never kept, a failed write)
must be in that log or void the compiler's mark; else a CE would keep a key the store
no longer has.  Each test compiles incrementally and compares with a fresh compile
from the same store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nc_server.compiler import CeConfig, VpnCompiler, compile_vpn
from nc_server.keystore import KeyStore
from nc_server.storage import SqliteStorage
from tests.test_compiler import mesh, parse_vpn, site, vpn_doc

VPN = "acme"


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(SqliteStorage.in_state_dir(tmp_path))


def _compiled(compiler: VpnCompiler, store: KeyStore, vpn: dict[str, Any]) -> dict[str, CeConfig]:
    """As the server compiles: in one key-store batch."""
    with store.batch():
        return compiler.compile(vpn)


def _same_as_fresh(result: dict[str, CeConfig], store: KeyStore, vpn: dict[str, Any]) -> None:
    with store.batch():
        fresh = compile_vpn(vpn, store)
    assert list(result) == list(fresh)
    for name, config in fresh.items():
        assert result[name].config == config.config, name
        assert result[name].version == config.version, name


def test_a_rotated_site_rebuilds_its_pairs_and_only_those(store: KeyStore) -> None:
    vpn = mesh(5)
    compiler = VpnCompiler(store)
    _compiled(compiler, store, vpn)
    builds = compiler.peer_builds
    store.rotate(VPN, "site-2", "pre-shared-keys")
    result = _compiled(compiler, store, vpn)
    assert compiler.peer_builds - builds == 2 * 4
    _same_as_fresh(result, store, vpn)


def test_an_operator_set_key_reaches_both_ends(store: KeyStore) -> None:
    vpn = mesh(3)
    compiler = VpnCompiler(store)
    _compiled(compiler, store, vpn)
    store.set_pre_shared_key(VPN, "site-3", "site-1", "k" * 40)
    result = _compiled(compiler, store, vpn)
    peer = {p["name"]: p for p in result["site-1"].config["peer"]}["site-3"]
    assert peer["ike"]["pre-shared-key"] == "k" * 40
    _same_as_fresh(result, store, vpn)


def test_each_step_of_an_ikeless_rekey_is_compiled(store: KeyStore) -> None:
    vpn = mesh(3, keying="ikeless")
    compiler = VpnCompiler(store)
    _compiled(compiler, store, vpn)
    step = store.begin_rekey(VPN, [("site-1", "site-2")])
    assert step.receivers == {"site-2"}
    _same_as_fresh(_compiled(compiler, store, vpn), store, vpn)
    store.receiver_applied(VPN, "site-2")
    _same_as_fresh(_compiled(compiler, store, vpn), store, vpn)


def _ikeless(result: dict[str, CeConfig], site: str, peer: str) -> dict[str, Any]:
    entry = next(e for e in result[site].config["peer"] if e["name"] == peer)
    keying: dict[str, Any] = entry["ikeless"]
    return keying


def test_an_sa_is_one_object_for_its_sender_and_its_receiver(store: KeyStore) -> None:
    """A million IKE-less entries hold half as many SAs when a direction's SA is shared by
    its sender's outbound and its receiver's inbound (the output is read-only)."""
    vpn = mesh(3, keying="ikeless")
    result = _compiled(VpnCompiler(store), store, vpn)
    sent = _ikeless(result, "site-1", "site-2")["outbound"]
    assert _ikeless(result, "site-2", "site-1")["inbound"] is sent
    lifetimes = {id(_ikeless(result, s, p)["outbound"]["lifetime"]) for s, p in
                 [("site-1", "site-2"), ("site-2", "site-3"), ("site-3", "site-1")]}  # fmt: skip
    assert len(lifetimes) == 1


def test_while_a_rekey_rolls_out_the_receiver_holds_the_next_sa(store: KeyStore) -> None:
    vpn = mesh(2, keying="ikeless")
    compiler = VpnCompiler(store)
    before = _compiled(compiler, store, vpn)
    old = _ikeless(before, "site-1", "site-2")["outbound"]
    store.begin_rekey(VPN, [("site-1", "site-2")])
    during = _compiled(compiler, store, vpn)
    assert _ikeless(during, "site-1", "site-2")["outbound"] == old
    assert _ikeless(during, "site-2", "site-1")["inbound"]["spi"] != old["spi"]
    _same_as_fresh(during, store, vpn)


def test_keys_a_dry_run_made_and_dropped_are_asked_again(store: KeyStore) -> None:
    """<validate> of an added site makes keys for its pairs and drops them; the commit
    that follows must not reuse what the dry run's compile saw."""
    sites = [site(f"site-{i}", i) for i in range(1, 4)]
    vpn = parse_vpn(vpn_doc(sites))
    grown = parse_vpn(vpn_doc([*sites, site("site-4", 4)]))
    compiler = VpnCompiler(store)
    _compiled(compiler, store, vpn)
    with store.dry_run():
        VpnCompiler(store).compile(grown)
    _same_as_fresh(_compiled(compiler, store, grown), store, grown)


def test_a_failed_batch_voids_the_marks(store: KeyStore) -> None:
    vpn = mesh(3)
    compiler = VpnCompiler(store)
    _compiled(compiler, store, vpn)
    mark = store.material_mark(VPN)
    assert store.changed_pairs(VPN, mark) == frozenset()
    with pytest.raises(RuntimeError), store.batch():
        store.rotate(VPN, "site-1", "pre-shared-keys")
        raise RuntimeError("storage went away")
    assert store.changed_pairs(VPN, mark) is None
    _same_as_fresh(_compiled(compiler, store, vpn), store, vpn)


def test_the_change_log_names_pairs_smaller_id_first(store: KeyStore) -> None:
    mark = store.material_mark(VPN)
    store.set_pre_shared_key(VPN, "b", "a", "k" * 40)
    assert store.changed_pairs(VPN, mark) == {("a", "b")}
    assert store.changed_pairs(VPN, "not a mark") is None
