"""Many CE agents in one process, for scale tests of the VPN server only.

    python -m bench.agent_farm SPEC.json      (prints READY once every agent listens)

or from a bench: ``start_farms(specs, per_process, work)`` and ``stop_farms(farms)``.

SPEC is a list of {"state_dir", "port", "bundle"}.  Each agent is a complete
cevpn agent (its own NETCONF server, SSH host key, datastore, bootstrap and
pull) with ``--dataplane none``: nothing touches the kernel, so nothing here
says anything about tunnels.  Running 50 of them per process instead of 50
processes keeps a 200-CE benchmark within a 2-core machine's memory and
start-up time; the NETCONF and SSH work per CE is the same.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


async def serve(spec: list[dict[str, object]]) -> None:
    from nc_agent.application import AgentApplication
    from nc_agent.bootstrap import apply_bundle
    from nc_agent.cli import CeApplication
    from nc_core.server import NetconfServer, ServerOptions
    from nc_core.transport_ssh import Listener

    servers: list[NetconfServer] = []
    for item in spec:
        state_dir = Path(str(item["state_dir"]))
        apply_bundle(
            NetconfServer(ServerOptions(state_dir=state_dir), CeApplication()),
            Path(str(item["bundle"])),
        )
        app = AgentApplication(state_dir, None, dataplane="none")
        options = ServerOptions(state_dir=state_dir, host="127.0.0.1", port=int(str(item["port"])))
        server = NetconfServer(options, app)
        await server.load()
        listener = Listener(server)
        server.listener = listener
        await listener.start()
        await app.started()
        servers.append(server)
    print("READY", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for server in servers:
        if server.listener is not None:
            server.listener.close()
        await server.app.stopping()
        server.close()


def start_farms(
    specs: Sequence[dict[str, Any]], per_process: int, work: Path
) -> list[subprocess.Popen[bytes]]:
    """Farm processes of ``per_process`` agents each, returned once every agent listens
    (each farm's spec and log are ``work/farm-I.json`` and ``.log``).  Blocking."""
    farms: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(0, len(specs), per_process):
            spec_file = work / f"farm-{i}.json"
            spec_file.write_text(json.dumps(list(specs[i : i + per_process])))
            with (work / f"farm-{i}.log").open("wb") as log:
                farms.append(subprocess.Popen(
                    [sys.executable, "-m", "bench.agent_farm", str(spec_file)],
                    cwd=ROOT, stdout=subprocess.PIPE, stderr=log,
                ))  # fmt: skip
        for farm in farms:
            assert farm.stdout is not None
            if b"READY" not in farm.stdout.readline():
                raise RuntimeError(f"an agent farm did not start; see the logs in {work}")
    except BaseException:
        stop_farms(farms)
        raise
    return farms


def stop_farms(farms: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every farm, then wait for each (SIGKILL after 60 s)."""
    for farm in farms:
        if farm.poll() is None:
            farm.terminate()
    for farm in farms:
        try:
            farm.wait(60)
        except subprocess.TimeoutExpired:
            farm.kill()
            farm.wait()


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int | str = "self") -> float:
    """A process's resident memory now (/proc/PID/status VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("ncclient", "paramiko", "asyncssh"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    spec = json.loads(Path(sys.argv[1]).read_text())
    import uvloop

    # CEVPN_FARM_PROFILE=DIR: a cProfile of this farm's event loop, written to DIR/<pid>.prof
    # when it stops (where the agents' CPU goes at scale; the profiler slows them).  With
    # CEVPN_FARM_PROFILE_ON_SIGNAL set, it profiles only between SIGUSR1 and SIGUSR2
    # (one step of bench/server_bench.py, --profile-farms), written at SIGUSR2.
    where = os.environ.get("CEVPN_FARM_PROFILE")
    if not where:
        uvloop.run(serve(spec))
        return
    import cProfile

    profiler = cProfile.Profile()
    out = str(Path(where) / f"{os.getpid()}.prof")
    if os.environ.get("CEVPN_FARM_PROFILE_ON_SIGNAL"):

        def begin(*_: Any) -> None:
            profiler.enable()

        def end(*_: Any) -> None:
            profiler.disable()
            profiler.dump_stats(out)

        signal.signal(signal.SIGUSR1, begin)
        signal.signal(signal.SIGUSR2, end)
        uvloop.run(serve(spec))
        return
    profiler.enable()
    try:
        uvloop.run(serve(spec))
    finally:
        profiler.disable()
        profiler.dump_stats(out)


if __name__ == "__main__":
    main()
