"""Many CE agents in one process, for scale tests of the VPN server only.

    python -m bench.agent_farm SPEC.json      (prints READY once every agent listens)

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
import signal
import sys
from pathlib import Path


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


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("ncclient", "paramiko", "asyncssh"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    spec = json.loads(Path(sys.argv[1]).read_text())
    import uvloop

    uvloop.run(serve(spec))


if __name__ == "__main__":
    main()
