"""The controller reaches the NETCONF engine only through its narrow Engine API.

A fake engine of a few lines stands in for nc_core here: what the controller
decides (notify a CE, report a status change, edit running on someone's
behalf) is seen as calls of that API, with no server, socket or CE.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from nc_core.errors import RpcError
from nc_server.controller import Controller
from nc_server.enrolment import CE_GROUP
from nc_server.provisioner import CeRecord
from nc_server.service_tree import SiteView, q

SETTINGS = {
    "max-concurrent-provisioning": 4,
    "unreachable-retry-limit": 10,
    "confirm-timeout": 30,
}


@dataclass
class FakeEngine:
    groups: dict[str, frozenset[str]] = field(default_factory=dict)
    tree: etree._Element | None = None
    refuse: Exception | None = None
    edits: list[tuple[str, Any]] = field(default_factory=list)
    statuses: list[tuple[str, str, str]] = field(default_factory=list)
    available: list[tuple[str, str, str]] = field(default_factory=list)

    async def edit_running(
        self, edit: Callable[[etree._Element], None], *, reason: str, on_behalf_of: Any
    ) -> None:
        self.edits.append((reason, on_behalf_of))
        assert self.tree is not None
        edit(self.tree)
        if self.refuse is not None:
            raise self.refuse

    def yang_default(self, path: str) -> Any:
        return None

    def groups_of(self, user: str) -> frozenset[str]:
        return self.groups.get(user, frozenset())

    def host_key(self) -> str:
        return "ssh-ed25519 AAAA server"

    def provisioning_status_changed(self, rec: CeRecord, previous: str, error: str | None) -> None:
        self.statuses.append((rec.site, previous, rec.status))

    def configuration_available(self, vpn: str, site: str, version: str) -> None:
        self.available.append((vpn, site, version))

    def site_removed(self, vpn: str, site: str) -> None:
        return None

    def still_unreachable(self, rec: CeRecord, error: str | None) -> None:
        return None

    def tunnel_statuses(self, vpn: str, site: str, statuses: Mapping[str, str]) -> None:
        return None

    def tunnel_event(self, vpn: str, site: str, event: str, peer: str, reason: str | None) -> None:
        return None


def site(name: str, autodiscovery: str = "notify-then-pull") -> SiteView:
    return SiteView(
        vpn="v",
        site=name,
        ce_address="192.0.2.1",
        management_address="192.0.2.1",
        management_port=830,
        host_keys=["ssh-ed25519 AAAA ce"],
        autodiscovery=autodiscovery,
        removal="database-only",
    )


@pytest.fixture
def ctl(tmp_path: Path) -> Iterator[tuple[Controller, FakeEngine]]:
    from nc_server.storage import SqliteStorage

    controller = Controller(SqliteStorage.in_state_dir(tmp_path), tmp_path, provisioning=False)
    engine = FakeEngine()
    controller.engine = engine
    controller.jobs.configure(SETTINGS)
    controller.sites = {"s1": site("s1")}
    yield controller, engine
    controller.storage.close()


def test_only_an_account_in_the_ce_group_is_a_ces(ctl: tuple[Controller, FakeEngine]) -> None:
    controller, engine = ctl
    assert controller.site_of_user("ce-s1") is None  # looks like a CE's, is not
    engine.groups["ce-s1"] = frozenset({CE_GROUP})
    assert controller.site_of_user("ce-s1") == "s1"
    engine.groups["ce-s2"] = frozenset({CE_GROUP})
    assert controller.site_of_user("ce-s2") is None  # no such site


def test_a_ce_back_is_told_to_fetch_through_the_engine(
    ctl: tuple[Controller, FakeEngine],
) -> None:
    controller, engine = ctl
    rec = controller.provisioner.record("v", "s1")
    rec.status, rec.target_version = "unreachable", "7"
    controller.ce_reachable("s1", "192.0.2.1")
    assert engine.statuses == [("s1", "unreachable", "pending")]
    assert engine.available == [("v", "s1", "7")]


def test_without_an_engine_status_changes_notify_nobody(tmp_path: Path) -> None:
    from nc_server.storage import SqliteStorage

    controller = Controller(SqliteStorage.in_state_dir(tmp_path), tmp_path, provisioning=False)
    controller.jobs.configure(SETTINGS)
    rec = controller.provisioner.record("v", "s1")
    controller.provisioner.set_status(rec, "in-sync")
    assert rec.status == "in-sync"
    controller.storage.close()


def _database() -> etree._Element:
    root = etree.Element("config")
    vpn = etree.SubElement(etree.SubElement(root, q("vpn-service")), q("vpn"))
    etree.SubElement(vpn, q("id")).text = "v"
    etree.SubElement(etree.SubElement(vpn, q("site")), q("id")).text = "s1"
    return root


def test_remove_site_edits_running_on_the_callers_behalf(
    ctl: tuple[Controller, FakeEngine],
) -> None:
    controller, engine = ctl
    engine.tree = _database()
    operator: Any = object()  # the engine's session: opaque to the controller
    asyncio.run(controller.remove_site("v", "s1", deprovision=True, session=operator))
    assert engine.edits == [("remove-site", operator)]
    assert engine.tree.find(f".//{q('site')}") is None
    assert controller.removal_override == {"s1": "deprovision"}  # until the commit applies


def test_a_refused_removal_leaves_no_override(ctl: tuple[Controller, FakeEngine]) -> None:
    controller, engine = ctl
    engine.tree = _database()
    engine.refuse = RpcError("access-denied", "no")
    with pytest.raises(RpcError):
        asyncio.run(controller.remove_site("v", "s1", deprovision=False))
    assert controller.removal_override == {}


def test_an_unknown_site_is_refused_before_the_engine_is_asked(
    ctl: tuple[Controller, FakeEngine],
) -> None:
    controller, engine = ctl
    with pytest.raises(RpcError) as caught:
        asyncio.run(controller.remove_site("v", "nope", deprovision=False))
    assert caught.value.app_tag == "unknown-site"
    assert engine.edits == []
