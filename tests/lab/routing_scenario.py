"""Run inside a lab guest: nc_agent.routing.Bird runs OSPF between three CEs' VPN spaces.

    python -m tests.lab.routing_scenario      (after `python -m lab.topology build 3`)

Plain IP-in-IP devices (no IPsec: this is a test of the daemon wrapper, not of
the data path) between ce1-ce2 and ce1-ce3, then a new ce2-ce3 tunnel.  One
asyncio loop drives a Bird per CE, as the agent would.  ce1's state directory
is longer than a Unix socket path may be.  Writes $WORK/routing.json.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nc_agent.routing.bird as bird_module
from lab.topology import Site
from nc_agent.dataplane.site_routes import SiteRoutes, StaticRoute
from nc_agent.routing.bird import Bird, RoutingError
from nc_agent.routing.bird_config import OspfInterface, RoutingPlan

WORK = Path(os.environ.get("WORK", "/tmp"))
SITES = {n: Site(n) for n in (1, 2, 3)}
TEN = re.compile(r"(?<![\d.])10\.\d+\.\d+\.\d+")
"""A 10.x address or prefix in `ip route` output (and not the end of 198.51.100.10)."""


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def mk(a: int, b: int, name: str) -> None:
    """An unnumbered IP-in-IP device from ce<a> to ce<b>, moved into ce<a>-vpn."""
    me, peer = SITES[a], SITES[b]
    ip("-n", me.ce, "link", "add", name, "type", "ipip", "local", me.sp_address,
       "remote", peer.sp_address, "ttl", "64")  # fmt: skip
    ip("-n", me.ce, "link", "set", name, "netns", me.vpn)
    ip("-n", me.vpn, "addr", "add", f"{me.lan_gateway}/32", "dev", name)
    ip("-n", me.vpn, "link", "set", name, "up")


def plan(n: int, costs: dict[str, int]) -> RoutingPlan:
    return RoutingPlan(
        router_id=SITES[n].lan_gateway,
        hello=1,
        dead=4,
        interfaces=tuple(OspfInterface(dev, cost) for dev, cost in sorted(costs.items())),
        announce=(SITES[n].lan_prefix,),
    )


def bird_routes(n: int) -> list[str]:
    return ip("-n", SITES[n].vpn, "route", "show", "proto", "bird").splitlines()


def device_to(n: int, address: str) -> str | None:
    """The VPN-space device ce<n> sends ``address`` into, None without a route."""
    try:
        out = ip("-n", SITES[n].vpn, "route", "get", address)
    except subprocess.CalledProcessError:
        return None
    m = re.search(r" dev (\S+)", out)
    return m.group(1) if m else None


def ping(src: int, dst: int) -> bool:
    argv = ["ping", "-c", "2", "-W", "2", SITES[dst].host_address]
    done = subprocess.run(["ip", "netns", "exec", SITES[src].host, *argv], capture_output=True)
    return done.returncode == 0


async def wait_for(check: Callable[[], bool], timeout: float = 60.0) -> float | None:
    """Seconds until ``check()`` held, None if it never did within ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return round(time.monotonic() - start, 2)
        await asyncio.sleep(0.1)
    return None


def converged(wanted: dict[int, dict[str, str]]) -> Callable[[], bool]:
    """ce<n> sends each address into the given device (by routes BIRD installed)."""

    def check() -> bool:
        return all(
            device_to(n, address) == dev
            for n, found in wanted.items()
            for address, dev in found.items()
        )

    return check


def leaks() -> dict[str, list[str]]:
    """10.x routes and BIRD routes in the provider core and the CEs' SP spaces."""
    found = {}
    for ns in ["pe", *(s.ce for s in SITES.values())]:
        table = ip("-n", ns, "route", "show", "table", "all").splitlines()
        found[ns] = [line for line in table if TEN.search(line) or "proto bird" in line]
    table = ip("route", "show", "table", "all").splitlines()  # the guest's own namespace
    found["guest"] = [line for line in table if TEN.search(line) or "proto bird" in line]
    return found


def modes(bird: Bird) -> dict[str, str]:
    paths = [bird.dir, bird.conf, bird.log_file, bird.stdout_file]
    return {p.name: oct(p.stat().st_mode & 0o777) for p in paths}


async def neighbors(bird: Bird) -> list[list[Any]]:
    return [[n.router_id, n.state, n.interface] for n in await bird.neighbors()]


async def scenario() -> dict[str, Any]:
    report: dict[str, Any] = {}
    ce1_dir = WORK / ("ce1-" + "a-long-state-directory-" * 4)
    birds = {1: Bird(ce1_dir, "ce1-vpn"), 2: Bird(WORK / "ce2", "ce2-vpn"),
             3: Bird(WORK / "ce3", "ce3-vpn")}  # fmt: skip
    report["ce1_socket_path_length"] = len(str(birds[1].socket))
    costs = {1: {"cvi0001": 10, "cvi0002": 10}, 2: {"cvi0001": 10}, 3: {"cvi0002": 10}}
    for a, b, name in ((1, 2, "cvi0001"), (2, 1, "cvi0001"), (1, 3, "cvi0002"), (3, 1, "cvi0002")):
        mk(a, b, name)

    # 1. three daemons; routes between all sites, 2 <-> 3 through ce1
    start = time.monotonic()
    for n, bird in birds.items():
        await bird.apply(plan(n, costs[n]))
    report["start_seconds"] = round(time.monotonic() - start, 2)
    report["pids"] = {n: b.pid for n, b in birds.items()}
    everywhere = {1: {"10.2.0.2": "cvi0001", "10.3.0.2": "cvi0002"},
                  2: {"10.1.0.2": "cvi0001", "10.3.0.2": "cvi0001"},
                  3: {"10.1.0.2": "cvi0002", "10.2.0.2": "cvi0002"}}  # fmt: skip
    found = await wait_for(converged(everywhere))
    report["seconds_to_routes"] = None if found is None else round(time.monotonic() - start, 2)
    report["neighbors_ce1"] = await neighbors(birds[1])
    report["ping_2_3_via_ce1"] = ping(2, 3)
    report["route_2_3_via_ce1"] = ip("-n", "ce2-vpn", "route", "get", "10.3.0.2").strip()

    # 1b. a static route towards a router of site 1 (routing/static-route): the agent's
    # layer installs it with proto 0xce, BIRD announces it, the other sites learn it
    branch = StaticRoute("10.1.128.0/24", SITES[1].host_address)
    SiteRoutes(SITES[1].vpn).apply({branch})
    with_branch = dataclasses.replace(
        plan(1, costs[1]), announce=(SITES[1].lan_prefix, branch.prefix)
    )
    await birds[1].apply(with_branch)
    report["static_route_ce1"] = ip("-n", SITES[1].vpn, "route", "show", branch.prefix).strip()
    report["seconds_to_static_route_learned"] = await wait_for(
        lambda: all(any(r.startswith(branch.prefix) for r in bird_routes(n)) for n in (2, 3))
    )
    report["static_route_ce2"] = ip("-n", SITES[2].vpn, "route", "show", branch.prefix).strip()
    # Withdrawn again, and gone everywhere before the next step compares route lists.
    SiteRoutes(SITES[1].vpn).apply(set())
    await birds[1].apply(plan(1, costs[1]))
    report["seconds_to_static_route_withdrawn"] = await wait_for(
        lambda: not any(r.startswith(branch.prefix) for n in (2, 3) for r in bird_routes(n))
    )

    # 2. a new ce2-ce3 tunnel: ce3's plan names it before the device exists, ce2's after
    costs[3]["cvi0003"] = 10
    await birds[3].apply(plan(3, costs[3]))
    mk(2, 3, "cvi0003")
    mk(3, 2, "cvi0003")
    start = time.monotonic()
    costs[2]["cvi0003"] = 10
    await birds[2].apply(plan(2, costs[2]))
    report["seconds_to_new_tunnel_route"] = await wait_for(
        converged({2: {"10.3.0.2": "cvi0003"}, 3: {"10.2.0.2": "cvi0003"}})
    )
    report["pids_after_new_tunnel"] = {n: b.pid for n, b in birds.items()}
    report["neighbors_ce2"] = await neighbors(birds[2])
    report["ping_2_3_direct"] = ping(2, 3)
    report["bird_routes"] = {n: bird_routes(n) for n in birds}
    report["ospf_routes_ce2"] = await birds[2].routes()
    report["leaks"] = leaks()
    report["modes"] = modes(birds[2])

    # 3. a dearer new tunnel: ce2 goes back through ce1, same daemon
    costs[2]["cvi0003"] = 100
    start = time.monotonic()
    await birds[2].apply(plan(2, costs[2]))
    report["seconds_to_cost_change"] = await wait_for(converged({2: {"10.3.0.2": "cvi0001"}}))
    report["pid_ce2_after_cost"] = birds[2].pid

    # 4. a configuration BIRD refuses: an error, and the previous one keeps running
    conf_before = hashlib.sha256(birds[2].conf.read_bytes()).hexdigest()
    real_render = bird_module.render
    bird_module.render = lambda p, log_file: real_render(p, log_file) + "protocol nonsense {}\n"
    try:
        await birds[2].apply(plan(2, {**costs[2], "cvi0003": 5}))
        report["refused"] = None
    except RoutingError as exc:
        report["refused"] = str(exc)
    finally:
        bird_module.render = real_render
    report["after_refusal"] = {
        "pid": birds[2].pid,
        "running": birds[2].running,
        "conf_unchanged": hashlib.sha256(birds[2].conf.read_bytes()).hexdigest() == conf_before,
        "new_conf_left": birds[2].new_conf.exists(),
        "plan_kept": birds[2].plan == plan(2, costs[2]),
        "device_to_3": device_to(2, "10.3.0.2"),
        "neighbors": await neighbors(birds[2]),
        "status": (await birds[2].birdc("show", "status")).splitlines()[-1],
    }

    # 5. a crash: on_exit hears it, and a later stop removes what the dead daemon left
    exits: list[int] = []
    birds[3].on_exit = exits.append
    crashed = birds[3].pid
    assert crashed is not None
    os.kill(crashed, signal.SIGKILL)
    await wait_for(lambda: bool(exits), 10)
    report["crash"] = {"on_exit": exits, "routes_left": len(bird_routes(3))}
    await Bird(WORK / "ce3", "ce3-vpn").apply(None)  # as a restarted agent would
    report["crash"]["routes_after_cleanup"] = bird_routes(3)
    report["crash"]["pid_file_after_cleanup"] = birds[3].pid_file.exists()

    # 6. stop: BIRD withdraws its routes and leaves nothing running
    pids = [b.pid for b in birds.values() if b.pid]
    for bird in birds.values():
        await bird.stop()
    report["after_stop"] = {
        "routes": {n: bird_routes(n) for n in birds},
        "processes": [pid for pid in pids if Path(f"/proc/{pid}").exists()],
        "pid_files": [str(b.pid_file) for b in birds.values() if b.pid_file.exists()],
        "running": [n for n, b in birds.items() if b.running],
    }
    return report


def main() -> None:
    try:
        out: Any = asyncio.run(scenario())
    except Exception as exc:
        out = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    (WORK / "routing.json").write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps(out, default=str)[:4000])
    sys.exit(1 if "error" in out else 0)


if __name__ == "__main__":
    main()
