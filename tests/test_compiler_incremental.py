"""The incremental compiler gives exactly what a fresh compile gives, after any edits.

``nc_server.compile_cache`` rebuilds only the entries whose fingerprinted inputs
changed.  An input it forgot to fingerprint would leave a stale entry: a CE keeping a
removed prefix, an old key, the wrong encapsulation.  Hypothesis drives one long-lived
``VpnCompiler`` through random sequences of the edits an operator (and key rotation)
makes, and after every step compares it with a compiler that starts from nothing.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nc_server.ce_config import CeEdit, edit_of_changes, incremental_edit
from nc_server.compiler import CompileError, VpnCompiler, compile_vpn, diff_configs
from tests.test_compiler import (
    FakeKeys,
    parse_vpn,
    site,
    validate,
    vpn_doc,
    without_changes,
)

SITE_IDS = [f"s{i}" for i in range(1, 7)]


def _initial(count: int) -> dict[str, Any]:
    return vpn_doc([site(SITE_IDS[i], i + 1) for i in range(count)])


def _sites(doc: dict[str, Any]) -> list[dict[str, Any]]:
    sites: list[dict[str, Any]] = doc["site"]
    return sites


# Each edit takes the raw VPN document, the key source and a drawn integer, and changes
# one thing the way an operator's edit-config (or a rotate-keys) would.


def add_site(doc: dict[str, Any], keys: FakeKeys, n: int) -> None:
    present = {s["id"] for s in _sites(doc)}
    free = [i for i, sid in enumerate(SITE_IDS) if sid not in present]
    if free:
        i = free[n % len(free)]
        role = {"role": "hub"} if doc.get("topology", {}).get("type") == "hub-and-spoke" else {}
        _sites(doc).append(site(SITE_IDS[i], i + 1, **role))


def remove_site(doc: dict[str, Any], keys: FakeKeys, n: int) -> None:
    if len(_sites(doc)) > 1:
        gone = _sites(doc).pop(n % len(_sites(doc)))["id"]
        if "internet-gateway" in doc:
            doc["internet-gateway"] = [g for g in doc["internet-gateway"] if g != gone]
            if not doc["internet-gateway"]:
                del doc["internet-gateway"]


def change_prefixes(doc: dict[str, Any], keys: FakeKeys, n: int) -> None:
    target = _sites(doc)[n % len(_sites(doc))]
    target["local-prefix"] = [f"10.{100 + n % 50}.{n % 7}.0/24", *target["local-prefix"][:1]]


def change_address(doc: dict[str, Any], keys: FakeKeys, n: int) -> None:
    _sites(doc)[n % len(_sites(doc))]["ce-address"] = f"198.51.100.{1 + n % 200}"


def toggle_hub_and_spoke(doc: dict[str, Any], keys: FakeKeys, n: int) -> None:
    if doc.get("topology", {}).get("type") == "hub-and-spoke":
        del doc["topology"]
        for s in _sites(doc):
            s.pop("role", None)
    else:
        doc["topology"] = {"type": "hub-and-spoke"}
        for i, s in enumerate(_sites(doc)):
            s["role"] = "hub" if i == n % len(_sites(doc)) or (n >> 3) % 3 == i else "spoke"


def flip_role(doc: dict[str, Any], keys: FakeKeys, n: int) -> None:
    if doc.get("topology", {}).get("type") == "hub-and-spoke":
        target = _sites(doc)[n % len(_sites(doc))]
        target["role"] = "spoke" if target.get("role") == "hub" else "hub"


def set_gateway(doc: dict[str, Any], keys: FakeKeys, n: int) -> None:
    if n % 3 == 0:
        doc.pop("internet-gateway", None)
    else:
        doc["internet-gateway"] = [_sites(doc)[n % len(_sites(doc))]["id"]]


def toggle_encapsulation(doc: dict[str, Any], keys: FakeKeys, n: int) -> None:
    defaults = doc.setdefault("tunnel-defaults", {})
    defaults["encapsulation"] = (
        "transport-ipip" if defaults.get("encapsulation") == "tunnel-mode" else "tunnel-mode"
    )


def override_encapsulation(doc: dict[str, Any], keys: FakeKeys, n: int) -> None:
    doc["security-profile"] = {"site-overridable": ["establishment", "encapsulation"]}
    target = _sites(doc)[n % len(_sites(doc))]
    if "overrides" in target:
        del target["overrides"]
    else:
        target["overrides"] = {"encapsulation": "tunnel-mode"}


def toggle_ikeless(doc: dict[str, Any], keys: FakeKeys, n: int) -> None:
    if doc.get("keying") == "ikeless":
        del doc["keying"]
    else:
        doc["keying"] = "ikeless"


def rotate_a_key(doc: dict[str, Any], keys: FakeKeys, n: int) -> None:
    ids = sorted(s["id"] for s in _sites(doc))
    a, b = ids[n % len(ids)], ids[(n // 7) % len(ids)]
    keys.rotate("psk", min(a, b), max(a, b))
    keys.rotate("sa", a, b)


EDITS = [
    add_site,
    remove_site,
    change_prefixes,
    change_address,
    toggle_hub_and_spoke,
    flip_role,
    set_gateway,
    toggle_encapsulation,
    override_encapsulation,
    toggle_ikeless,
    rotate_a_key,
]


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(
    start=st.integers(min_value=1, max_value=4),
    steps=st.lists(
        st.tuples(st.sampled_from(EDITS), st.integers(min_value=0, max_value=10_000)),
        min_size=1,
        max_size=8,
    ),
)
def test_incremental_compile_equals_a_fresh_compile_after_any_edits(start, steps) -> None:
    keys = FakeKeys()
    doc = _initial(start)
    compiler = VpnCompiler(keys)
    previous = compiler.compile(parse_vpn(doc))
    for edit, n in steps:
        candidate = copy.deepcopy(doc)
        edit(candidate, keys, n)
        try:
            vpn = parse_vpn(candidate)
            fresh = compile_vpn(vpn, keys)
        except Exception as exc:  # an edit the model or the rules refuse
            # A refused edit never reaches the compiler of a running server; the cache
            # must still serve the last good document unchanged.
            if isinstance(exc, CompileError):
                try:
                    compiler.compile(vpn)
                except CompileError:
                    pass
            assert compiler.compile(parse_vpn(doc)) == previous
            continue
        doc = candidate
        result = compiler.compile(vpn)
        assert list(result) == list(fresh)
        for name, config in fresh.items():
            assert result[name].version == config.version, (edit.__name__, name)
            assert result[name].config == config.config, (edit.__name__, name)
        validate(result.values())
        expected_changed = {
            s
            for s in set(previous) | set(result)
            if s not in previous or s not in result or previous[s].version != result[s].version
        }
        delta = diff_configs(previous, result)
        assert set(delta) == expected_changed
        # What the engine said changed is what comparing entry by entry finds.
        assert delta == diff_configs(without_changes(previous), without_changes(result))
        previous = result


def _edited(old: dict[str, Any], new: dict[str, Any], edit: CeEdit) -> dict[str, Any]:
    """What a CE holding ``old`` holds after ``edit`` (parts taken from ``new``)."""
    out = {k: v for k, v in old.items() if k != "peer" and k not in edit.removed_sections}
    out.update({k: new[k] for k in edit.sections})
    peers = {p["name"]: p for p in old.get("peer", []) if p["name"] not in edit.removed_peers}
    peers.update({p["name"]: p for p in new.get("peer", []) if p["name"] in edit.peers})
    if peers:
        out["peer"] = sorted(peers.values(), key=lambda p: p["name"])
    return out


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(
    start=st.integers(min_value=1, max_value=4),
    steps=st.lists(
        st.tuples(st.sampled_from(EDITS), st.integers(min_value=0, max_value=10_000)),
        min_size=1,
        max_size=6,
    ),
)
def test_the_edit_read_from_the_compilers_changes_gives_the_ce_its_new_configuration(
    start, steps
) -> None:
    """edit_of_changes (what a push sends when the CE runs the previous compile's
    configuration) turns that configuration into the new one, as incremental_edit does."""
    keys = FakeKeys()
    doc = _initial(start)
    compiler = VpnCompiler(keys)
    previous = compiler.compile(parse_vpn(doc))
    for edit, n in steps:
        candidate = copy.deepcopy(doc)
        edit(candidate, keys, n)
        try:
            result = compiler.compile(parse_vpn(candidate))
        except Exception:  # an edit the model or the rules refuse
            continue
        doc = candidate
        for name, config in result.items():
            changes = config.changes
            if name not in previous or changes is None or previous[name] == config:
                continue  # new, rebuilt whole, or unchanged (nothing is pushed)
            assert changes.since == previous[name].version
            old = previous[name].config
            made = _edited(old, config.config, edit_of_changes(config.config, changes))
            compared = _edited(old, config.config, incremental_edit(old, config.config))
            want = {**config.config, "peer": sorted(config.config.get("peer", []),
                                                     key=lambda p: p["name"])}  # fmt: skip
            if not want["peer"]:
                del want["peer"]
            assert made == want == compared, (edit.__name__, name)
        previous = result
