"""Filters cannot stall other sessions: costly ones run in a worker process under a budget.

A hostile XPath filter (``//*[count(//*[count(//*//*) > 0]) > 0]``) costs cubic time in
the data's size; evaluated on the server's event loop it kept every other session waiting
for more than 30 s.  These tests pin down the pieces: the classifier deciding what may run
in-process (:func:`nc_core.filters.cheap`), the worker giving exactly the in-process
answer, the budget, the per-user cap, a dying worker; then the whole against a real
server over SSH.  No test depends on timing luck: they wait on conditions and assert the
order of events, never a latency.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from lxml import etree
from ncclient.operations.rpc import RPCError

from nc_core import filters
from nc_core.errors import RpcError
from nc_core.filter_worker import FilterRunner, frame
from nc_core.users import initial_nacm
from nc_core.xmlutil import NACM_NS, NC_NS
from tests.netconf_server import ADMIN, OPERATOR, ServerProcess, ncclient_connect, running_server

SVC = "urn:cevpn:yang:cevpn-service"
CFG = "http://example.com/schema/1.2/config"
STATS = "http://example.com/schema/1.2/stats"
HOSTILE = "//*[count(//*[count(//*//*) > 0]) > 0]"

T = TypeVar("T")


# -- data ----------------------------------------------------------------------------------


def vpn(n: int, sites: int = 2) -> str:
    site_xml = "".join(
        f"<site><name>s{n}-{k}</name><ce-address>192.0.2.{k + 1}</ce-address>"
        f"<prefix>10.{n % 250}.{k}.0/24</prefix><prefix>10.{n % 250}.{k + 100}.0/24</prefix>"
        "</site>"
        for k in range(sites)
    )
    return (
        f"<vpn><id>vpn-{n}</id><customer>{'ACME' if n % 2 else 'Globex'}</customer>"
        f"<description>VPN number {n}</description>"
        f"<topology><type>{'hub-and-spoke' if n % 3 else 'full-mesh'}</type></topology>"
        f"{site_xml}</vpn>"
    )


def datastore(vpns: int = 6, sites: int = 2) -> etree._Element:
    """A datastore as the server holds one: NACM, the service, and the RFC 6241 examples."""
    users = "".join(
        f"<user><name>{name}</name><type>{kind}</type><full-name>{full}</full-name>"
        f"<company-info><dept>{dept}</dept><id>{n}</id></company-info></user>"
        for n, (name, kind, full, dept) in enumerate(
            [
                ("root", "superuser", "Charlie Root", 1),
                ("fred", "admin", "Fred Flintstone", 2),
                ("barney", "admin", "Barney Rubble", 2),
            ]
        )
    )
    xml = (
        f'<data xmlns="{NC_NS}">'
        f'<vpn-service xmlns="{SVC}">'
        "<server><endpoint><address>192.0.2.1</address><port>830</port></endpoint></server>"
        f"{''.join(vpn(n, sites) for n in range(vpns))}</vpn-service>"
        f'<top xmlns="{CFG}"><users>{users}</users></top>'
        f'<t:top xmlns:t="{STATS}"><t:interfaces>'
        '<t:interface t:ifName="eth0"><t:ifInOctets>45621</t:ifInOctets></t:interface>'
        '<t:interface t:ifName="eth1"><t:ifInOctets>1</t:ifInOctets></t:interface>'
        "</t:interfaces></t:top></data>"
    )
    data = etree.fromstring(xml)
    data.insert(0, initial_nacm())
    return data


def keys_of(elem: etree._Element) -> Sequence[str]:
    keys = {
        f"{{{SVC}}}vpn": (f"{{{SVC}}}id",),
        f"{{{SVC}}}site": (f"{{{SVC}}}name",),
        f"{{{SVC}}}endpoint": (f"{{{SVC}}}address",),
        f"{{{CFG}}}user": (f"{{{CFG}}}name",),
        f"{{{NACM_NS}}}rule-list": (f"{{{NACM_NS}}}name",),
        f"{{{NACM_NS}}}rule": (f"{{{NACM_NS}}}name",),
        f"{{{NACM_NS}}}group": (f"{{{NACM_NS}}}name",),
    }
    return keys.get(str(elem.tag), ())


def xpath(select: str, **prefixes: str) -> etree._Element:
    nsmap: dict[Any, str] = {None: NC_NS, **prefixes}
    return etree.Element(f"{{{NC_NS}}}filter", type="xpath", select=select, nsmap=nsmap)


def subtree(content: str) -> etree._Element:
    return etree.fromstring(f'<filter xmlns="{NC_NS}" type="subtree">{content}</filter>')


def shape(elem: etree._Element) -> Any:
    return (
        elem.tag,
        sorted(elem.attrib.items()),
        (elem.text or "").strip(),
        [shape(c) for c in elem],
    )


def run(make: Callable[[FilterRunner], Awaitable[T]], **options: Any) -> T:
    """Run a coroutine with a FilterRunner that is closed (workers reaped) afterwards."""

    async def main() -> T:
        async with FilterRunner(**options) as runner:
            return await make(runner)

    return asyncio.run(main())


async def until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Wait for a condition (the timeout only turns a hang into a failure)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.01)


# -- the classifier --------------------------------------------------------------------------

S = {"s": SVC}
CHEAP_XPATH = [
    ("/s:vpn-service/s:vpn[s:id='vpn-1']/s:site", S),
    ("/s:vpn-service//s:site", S),
    ("//s:vpn", S),
    ("/s:vpn-service/s:vpn/s:id | /n:nacm/n:groups", {**S, "n": NACM_NS}),
    ("/s:vpn-service/s:vpn[s:customer='ACME' and s:topology/s:type='full-mesh']/s:id", S),
    ("/s:vpn-service/s:vpn[s:id='vpn-1' or s:id='vpn-2']/s:description", S),
    ("/s:vpn-service/s:vpn/s:site[s:name='s1-0']/s:prefix/text()", S),
    ("/s:vpn-service/s:vpn[count(s:site) > 1]/s:id", S),
    ("/s:vpn-service/s:vpn[contains(s:description, 'number')]", S),
    ("/s:vpn-service/s:vpn[starts-with(s:id, 'vpn-')][1]", S),
    ("/s:vpn-service/s:vpn[position() = last()]", S),
    ("/s:vpn-service/s:vpn[not(s:topology)]", S),
    ("/s:vpn-service/s:vpn[s:site[s:name='s1-0']]/s:customer", S),
    ("/s:vpn-service/child::s:vpn/self::s:vpn/attribute::*", S),
    ("/vpn-service/vpn[id='vpn-1']", {}),  # yangcli: unprefixed names
    ("/", {}),
]
COSTLY_XPATH = [
    (HOSTILE, "'//' inside a predicate"),
    ("/s:vpn-service/s:vpn[count(/s:vpn-service/s:vpn) > 1]", "absolute path inside a predicate"),
    ("//s:vpn[preceding::s:vpn]", "preceding axis"),
    ("//s:site[ancestor::s:vpn]", "ancestor axis"),
    ("/s:vpn-service/s:vpn[following-sibling::s:vpn]", "following-sibling axis"),
    ("/s:vpn-service/descendant::s:site", "descendant axis"),
    ("/s:vpn-service/s:vpn[../s:server]", "'..'"),
    ("/s:vpn-service/s:vpn/s:site/..", "'..'"),
    ("//s:vpn//s:site//s:prefix", "more than 2 times"),
    ("/s:vpn-service[.//s:prefix='10.0.0.0/24']", "'//' inside a predicate"),
    ("/s:vpn-service[s:vpn[s:site[s:prefix]]]", "nested more than 2 deep"),
    ("/s:vpn-service/s:vpn[s:id = s:customer]", "compares two node-sets"),
    ("/s:vpn-service/s:vpn[$x]", "'$'"),
    ("/s:vpn-service/s:vpn[re:test(s:id, 'v.*')]", "not an XPath 1.0 core function"),
    ("/s:vpn-service/s:vpn[concat(.,.,.,.,.,.,.,.,.) = 'x']", "concat()"),
    (" | ".join(["/s:vpn-service/s:vpn"] * 60), "longer than 256 tokens"),
]


@pytest.mark.parametrize(("select", "prefixes"), CHEAP_XPATH, ids=[c[0] for c in CHEAP_XPATH])
def test_common_xpath_filters_are_cheap(select: str, prefixes: dict[str, str]) -> None:
    filt = xpath(select, **prefixes)
    assert filters.costly_reason(filt, filters.data_size(datastore())) is None
    assert filters.cheap(datastore(), filt)


@pytest.mark.parametrize(("select", "why"), COSTLY_XPATH, ids=[c[0][:60] for c in COSTLY_XPATH])
def test_xpath_filters_that_may_cost_more_than_linear_time_are_costly(
    select: str, why: str
) -> None:
    filt = xpath(select, s=SVC, re="http://exslt.org/regular-expressions")
    assert not filters.cheap(datastore(), filt)
    reason = filters.costly_reason(filt, 100)
    assert reason is not None and why in reason


def test_quadratic_xpath_constructs_are_cheap_on_small_data_only() -> None:
    # Unions and a second '//' make libxml2 merge node-sets, quadratic in their size.
    for select in ("/s:vpn-service//s:site", "/s:vpn-service/s:vpn | //s:site"):
        assert filters.cheap(datastore(vpns=6), xpath(select, s=SVC))
        assert not filters.cheap(datastore(vpns=1000), xpath(select, s=SVC))
    # A plain path stays cheap on the large tree.
    assert filters.cheap(datastore(vpns=1000), xpath("/s:vpn-service/s:vpn[s:id='x']", s=SVC))


def test_no_filter_and_small_subtree_filters_are_cheap() -> None:
    data = datastore()
    assert filters.cheap(data, None)
    assert filters.cheap(
        data, subtree(f'<vpn-service xmlns="{SVC}"><vpn><id>vpn-1</id></vpn></vpn-service>')
    )


def test_subtree_filter_cost_is_filter_nodes_times_data_size() -> None:
    data = datastore(vpns=100)
    branch = "<vpn><site><prefix/></site></vpn>"
    size = filters.data_size(data)
    copies = filters.SUBTREE_COST_LIMIT // size // 3 + 1
    big = subtree(f'<vpn-service xmlns="{SVC}">{branch * copies}</vpn-service>')
    assert not filters.cheap(data, big)
    reason = filters.costly_reason(big, size)
    assert reason is not None and "subtree filter" in reason
    assert filters.cheap(datastore(vpns=1), big)


def test_filters_select_refuses_are_cheap_so_they_are_refused_at_once() -> None:
    data = datastore()
    unknown = etree.Element(f"{{{NC_NS}}}filter", type="regex")
    no_select = etree.Element(f"{{{NC_NS}}}filter", type="xpath")
    assert filters.cheap(data, unknown) and filters.cheap(data, no_select)


def test_select_then_build_is_apply_filter() -> None:
    data = datastore()
    for filt in (None, xpath("//s:site[s:name='s1-1']/s:prefix", s=SVC)):
        selection = filters.select(data, filt, keys_of)
        assert shape(filters.build(data, selection, keys_of)) == shape(
            filters.apply_filter(data, filt, keys_of)
        )


# -- the worker gives the in-process answer ----------------------------------------------------

CORPUS: list[tuple[str, Callable[[], etree._Element]]] = [
    ("empty subtree", lambda: subtree("")),
    ("subtree whole module", lambda: subtree(f'<vpn-service xmlns="{SVC}"/>')),
    (
        "subtree key match, some leaves",
        lambda: subtree(
            f'<vpn-service xmlns="{SVC}"><vpn><id>vpn-3</id><customer/>'
            "<site><name>s3-1</name><prefix/></site></vpn></vpn-service>"
        ),
    ),
    (
        "subtree content match on a non-key",
        lambda: subtree(
            f'<vpn-service xmlns="{SVC}"><vpn><customer>ACME</customer></vpn></vpn-service>'
        ),
    ),
    (
        "subtree selection in lists, keys added",
        lambda: subtree(
            f'<vpn-service xmlns="{SVC}"><vpn><site><ce-address/></site></vpn></vpn-service>'
        ),
    ),
    (
        "subtree attribute match",
        lambda: subtree(
            f'<t:top xmlns:t="{STATS}"><t:interfaces><t:interface t:ifName="eth1"/>'
            "</t:interfaces></t:top>"
        ),
    ),
    (
        "subtree without namespace",
        lambda: subtree('<top xmlns=""><users><user><name>fred</name><type/></user></users></top>'),
    ),
    (
        "subtree two modules",
        lambda: subtree(f'<nacm xmlns="{NACM_NS}"><enable-nacm/></nacm><top xmlns="{CFG}"/>'),
    ),
    ("xpath root", lambda: xpath("/")),
    ("xpath nothing", lambda: xpath("/s:vpn-service/s:nothing", s=SVC)),
    ("xpath key", lambda: xpath("/s:vpn-service/s:vpn[s:id='vpn-2']/s:site", s=SVC)),
    ("xpath leaf in lists", lambda: xpath("//s:site/s:ce-address", s=SVC)),
    ("xpath text()", lambda: xpath("/s:vpn-service/s:vpn/s:description/text()", s=SVC)),
    ("xpath attribute", lambda: xpath("//t:interface/@t:ifName[. = 'eth0']", t=STATS)),
    (
        "xpath union, two prefixes",
        lambda: xpath("//c:user[c:name='fred']/c:type | /n:nacm/n:rule-list", c=CFG, n=NACM_NS),
    ),
    ("xpath unprefixed", lambda: xpath("/vpn-service/vpn[customer='ACME']/id")),
    (
        "xpath costly axes",
        lambda: xpath("//s:prefix[ancestor::s:vpn[s:customer='Globex']][1]", s=SVC),
    ),
    (
        "xpath nested absolute paths",
        lambda: xpath("//s:vpn[s:id = /s:vpn-service/s:vpn[last()]/s:id]/s:site[1]", s=SVC),
    ),
    (
        "xpath prefix declared on the rpc",
        lambda: etree.fromstring(
            f'<rpc xmlns="{NC_NS}" xmlns:s="{SVC}" message-id="1"><get><filter type="xpath" '
            "select=\"//s:vpn[preceding-sibling::s:vpn[1]/s:id='vpn-1']/s:id\"/></get></rpc>"
        )[0][0],
    ),
]


@pytest.mark.parametrize("make_filter", [c[1] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_worker_returns_what_apply_filter_returns(
    make_filter: Callable[[], etree._Element],
) -> None:
    data = datastore()
    filt = make_filter()
    expected = filters.apply_filter(data, filt, keys_of)

    async def in_worker(runner: FilterRunner) -> etree._Element:
        selection = await runner.select(data, filt, user="admin")
        return filters.build(data, selection, keys_of)

    assert shape(run(in_worker)) == shape(expected)


@pytest.mark.parametrize(
    "make_filter",
    [
        lambda: xpath("/nope:top"),
        lambda: xpath("count(//s:vpn[ancestor::*])", s=SVC),
        lambda: xpath("//s:vpn[preceding::s:vpn"),
    ],
    ids=["undeclared prefix", "not a node-set", "syntax error"],
)
def test_worker_reports_the_errors_select_raises(
    make_filter: Callable[[], etree._Element],
) -> None:
    data = datastore()
    filt = make_filter()
    with pytest.raises(RpcError) as in_process:
        filters.apply_filter(data, filt, keys_of)

    async def in_worker(runner: FilterRunner) -> None:
        await runner.select(data, filt, user="admin")

    with pytest.raises(RpcError) as from_worker:
        run(in_worker)
    for attr in ("tag", "type", "message", "info", "app_tag"):
        assert getattr(from_worker.value, attr) == getattr(in_process.value, attr)


def test_apply_runs_costly_filters_in_a_worker_and_cheap_ones_in_process() -> None:
    data = datastore()
    costly = xpath("//s:vpn[preceding-sibling::s:vpn]/s:id", s=SVC)
    cheap = xpath("/s:vpn-service/s:vpn[s:id='vpn-1']", s=SVC)

    async def both(runner: FilterRunner) -> tuple[int, int]:
        await runner.apply(data, cheap, keys_of, user="admin")
        after_cheap = len(runner.processes)
        result = await runner.apply(data, costly, keys_of, user="admin")
        assert shape(result) == shape(filters.apply_filter(data, costly, keys_of))
        return after_cheap, len(runner.processes)

    assert run(both) == (0, 1)


def test_subtree_selection_stops_once_it_has_looked_at_max_steps_data_nodes() -> None:
    data = datastore(vpns=100)
    every_prefix = subtree(f'<vpn-service xmlns="{SVC}"><vpn><site><prefix/></site></vpn>'
                           "</vpn-service>")  # fmt: skip
    with pytest.raises(filters.OverBudget):
        filters.select(data, every_prefix, keys_of, max_steps=500)
    unbounded = filters.select(data, every_prefix, keys_of)
    assert shape(filters.build(data, unbounded, keys_of)) == shape(
        filters.build(data, filters.select(data, every_prefix, keys_of, max_steps=10**6), keys_of)
    )


def test_a_whole_list_by_subtree_filter_runs_in_process_however_large_the_list() -> None:
    # The static bound calls it costly (it must assume every filter node matches every data
    # node); visited, it reads one level of the list: no worker, the same answer.
    data = datastore(vpns=3000)
    whole_list = subtree(f'<vpn-service xmlns="{SVC}"><vpn/></vpn-service>')
    assert not filters.cheap(data, whole_list)

    async def apply(runner: FilterRunner) -> tuple[int, int]:
        result = await runner.apply(data, whole_list, keys_of, user="admin")
        return len(result[0].findall(f"{{{SVC}}}vpn")), len(runner.processes)

    assert run(apply) == (3000, 0)


def test_a_subtree_filter_over_its_in_process_steps_moves_to_a_worker_with_the_same_answer() -> (
    None
):
    data = datastore(vpns=1500)
    every_prefix = subtree(f'<vpn-service xmlns="{SVC}"><vpn><site><prefix/></site></vpn>'
                           "</vpn-service>")  # fmt: skip
    assert not filters.cheap(data, every_prefix)

    async def apply(runner: FilterRunner) -> tuple[Any, int]:
        result = await runner.apply(data, every_prefix, keys_of, user="admin")
        return shape(result), len(runner.processes)

    expected = shape(filters.apply_filter(data, every_prefix, keys_of))
    assert run(apply, in_process_steps=500) == (expected, 1)


# -- budget, cap, failures ------------------------------------------------------------------


def test_filter_over_budget_is_resource_denied_and_the_next_one_works() -> None:
    data = datastore(vpns=120)  # ~2,000 elements: the hostile filter needs hours
    assert 1500 < int(data.xpath("count(//*)")) < 3000

    async def scenario(runner: FilterRunner) -> None:
        with pytest.raises(RpcError) as caught:
            await runner.apply(data, xpath(HOSTILE), keys_of, user="operator")
        err = caught.value
        assert (err.tag, err.type, err.app_tag) == (
            "resource-denied",
            "application",
            "filter-too-costly",
        )
        assert ("bad-element", "filter") in err.info
        assert "0.5 s budget" in err.message and "inside predicates" in err.message
        assert runner.processes == []  # the worker was killed
        fine = xpath("//s:vpn[preceding-sibling::s:vpn][1]/s:id", s=SVC)
        result = await runner.apply(data, fine, keys_of, user="operator")
        assert shape(result) == shape(filters.apply_filter(data, fine, keys_of))
        assert len(runner.processes) == 1  # a new worker

    run(scenario, budget=0.5)


def test_one_user_cannot_have_more_than_its_share_of_costly_filters_pending(
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = datastore(vpns=120)

    async def scenario(runner: FilterRunner) -> None:
        hostile = [
            asyncio.create_task(runner.apply(data, xpath(HOSTILE), keys_of, user="mallory"))
            for _ in range(2)
        ]
        await until(lambda: runner.pending("mallory") == 2, "both are pending")
        with caplog.at_level(logging.INFO, logger="cevpn.netconf"):
            with pytest.raises(RpcError) as caught:
                await runner.apply(data, xpath(HOSTILE), keys_of, user="mallory")
        assert caught.value.tag == "resource-denied"
        assert "2 costly filters running or waiting" in caught.value.message
        assert any("mallory" in r.getMessage() for r in caplog.records)
        assert not any("vpn-" in r.getMessage() for r in caplog.records)  # never the data
        # Another user is not refused: its filter waits for a worker.
        other = asyncio.create_task(runner.apply(data, xpath(HOSTILE), keys_of, user="operator"))
        await until(lambda: runner.pending("operator") == 1, "the other user's filter waits")
        assert not other.done()
        for task in [*hostile, other]:
            task.cancel()
        await asyncio.gather(*hostile, other, return_exceptions=True)
        assert runner.pending("mallory") == 0 and runner.processes == []

    run(scenario, workers=1, budget=600.0)


def test_worker_killed_mid_request_gives_operation_failed_and_the_next_request_works() -> None:
    data = datastore(vpns=120)

    async def scenario(runner: FilterRunner) -> None:
        task = asyncio.create_task(runner.apply(data, xpath(HOSTILE), keys_of, user="admin"))
        await until(lambda: bool(runner.processes), "a worker runs")
        os.kill(runner.processes[0].pid, signal.SIGKILL)
        with pytest.raises(RpcError) as caught:
            await task
        assert (caught.value.tag, caught.value.type) == ("operation-failed", "application")
        assert "Traceback" not in caught.value.message
        fine = xpath("//s:vpn[preceding-sibling::s:vpn]/s:id", s=SVC)
        result = await runner.apply(data, fine, keys_of, user="admin")
        assert shape(result) == shape(filters.apply_filter(data, fine, keys_of))

    run(scenario, budget=600.0)


GARBAGE_WORKER = """
import sys
out = sys.stdout.buffer
out.write(b'\\x00\\x00\\x00\\x0e{"ready":true}'); out.flush()
sys.stdin.buffer.read(1)
out.write(b'\\x00\\x00\\x00\\x05[1,2]'); out.flush()
sys.stdin.buffer.read()
"""


def test_worker_answering_garbage_is_replaced_and_the_request_gets_operation_failed() -> None:
    data = datastore()
    filt = xpath("//s:vpn[preceding-sibling::s:vpn]/s:id", s=SVC)

    async def scenario(runner: FilterRunner) -> None:
        runner.worker_command = (sys.executable, "-c", GARBAGE_WORKER)
        with pytest.raises(RpcError) as caught:
            await runner.apply(data, filt, keys_of, user="admin")
        assert caught.value.tag == "operation-failed"
        assert runner.processes == []
        runner.worker_command = FilterRunner.worker_command
        result = await runner.apply(data, filt, keys_of, user="admin")
        assert shape(result) == shape(filters.apply_filter(data, filt, keys_of))

    run(scenario)


def test_worker_left_alone_stops_itself_once_its_cpu_time_passes_the_budget() -> None:
    # As if the server died mid-request: nobody kills the worker, the kernel does.
    import subprocess

    data = datastore(vpns=120)
    request = frame(
        {"budget": 1.0},
        etree.tostring(xpath(HOSTILE)),
        etree.tostring(data),
    )
    worker = subprocess.Popen(
        [sys.executable, "-P", "-m", "nc_core.filter_worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert worker.stdin is not None
        worker.stdin.write(request)
        worker.stdin.flush()
        assert worker.wait(timeout=120) == -signal.SIGXCPU
    finally:
        worker.kill()
        worker.wait()


def test_worker_imports_only_lxml_and_the_filter_modules() -> None:
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-P", "-X", "importtime", "-m", "nc_core.filter_worker"],
        input=b"",
        capture_output=True,
        check=True,
    )
    modules = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.decode().splitlines()}
    assert {"lxml.etree", "nc_core.filters"} <= modules
    assert not modules & {"asyncio", "logging", "nc_core.server", "libyang", "asyncssh"}


# -- against a real server over SSH ----------------------------------------------------------


def worker_processes(server: ServerProcess) -> list[int]:
    """The server's child processes (its filter workers)."""
    assert server.proc is not None
    children: list[int] = []
    for task in Path(f"/proc/{server.proc.pid}/task").iterdir():
        children += [int(pid) for pid in (task / "children").read_text().split()]
    return children


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(
        tmp_path_factory.mktemp("budget"), "cevpn-server", "--filter-budget", "2"
    ) as srv:
        yield srv


def test_hostile_xpath_does_not_delay_another_clients_get_config(server: ServerProcess) -> None:
    small_answered = threading.Event()
    outcome: dict[str, Any] = {}
    with ncclient_connect(server, OPERATOR) as hostile, ncclient_connect(server, ADMIN) as quiet:
        # Each session is open before the hostile request goes out.

        def attack() -> None:
            try:
                hostile.get(filter=("xpath", HOSTILE))
                outcome["reply"] = "data"
            except RPCError as exc:
                outcome["reply"] = exc.tag
            outcome["small answered before"] = small_answered.is_set()

        thread = threading.Thread(target=attack)
        thread.start()
        try:
            # The server started a worker: the hostile filter is being evaluated.
            deadline = time.monotonic() + 60
            while not worker_processes(server):
                assert time.monotonic() < deadline, "the server started no filter worker"
                assert thread.is_alive(), f"the hostile request ended early: {outcome}"
                time.sleep(0.01)
            reply = quiet.get_config(
                source="running",
                filter=(
                    "subtree",
                    f'<nacm xmlns="{NACM_NS}"><rule-list><name/></rule-list></nacm>',
                ),
            )
            small_answered.set()
            assert "<name>admin</name>" in reply.data_xml
        finally:
            thread.join(120)
    assert outcome == {"reply": "resource-denied", "small answered before": True}


def test_hostile_xpath_is_refused_and_the_session_goes_on(server: ServerProcess) -> None:
    with ncclient_connect(server, ADMIN) as m:
        with pytest.raises(RPCError) as caught:
            m.get(filter=("xpath", HOSTILE))
        assert caught.value.tag == "resource-denied"
        assert "2 s budget" in caught.value.message
        reply = m.get(
            filter=f'<filter xmlns="{NC_NS}" xmlns:n="{NACM_NS}" type="xpath" '
            'select="/n:nacm/n:rule-list/n:name"/>'
        )
        assert "<name>admin</name>" in reply.data_xml


def test_subscription_with_costly_xpath_filter_is_refused(server: ServerProcess) -> None:
    with ncclient_connect(server, ADMIN) as m:
        with pytest.raises(RPCError) as caught:
            m.create_subscription(filter=("xpath", "//*[count(//*) > 0]"))
        assert caught.value.tag == "invalid-value"
        assert "every event" in caught.value.message
        assert "'//' inside a predicate" in caught.value.message
    with ncclient_connect(server, ADMIN) as m:
        m.create_subscription(filter=("xpath", "/netconf-session-start/username"))
