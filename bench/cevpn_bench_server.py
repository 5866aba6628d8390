"""cevpn's NETCONF engine serving the benchmark module, as its own process.

    python -m bench.cevpn_bench_server --state-dir DIR --listen 127.0.0.1:PORT --key KEY.pub

The same nc_core as cevpn-server and cevpn-agent, with an application that
only stores its configuration (as the reference netconfd does with a
schema-only module), so the benchmark measures the NETCONF engine.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from nc_core.cli_common import parse_listen, run_event_loop
from nc_core.server import NetconfServer, ServerOptions
from nc_core.transaction import Application
from nc_core.transport_ssh import serve_forever

BENCH_YANG = Path(__file__).resolve().parent / "yang"


class BenchApplication(Application):
    modules = ("cevpn-bench",)


def make_server(state_dir: Path, host: str, port: int) -> NetconfServer:
    options = ServerOptions(
        state_dir=state_dir, host=host, port=port, yang_dirs=(BENCH_YANG,), name="cevpn-bench"
    )
    return NetconfServer(options, BenchApplication())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--listen", type=parse_listen, required=True)
    parser.add_argument("--key", type=Path, required=True, help="client public key to authorise")
    parser.add_argument("--user", default="bench")
    args = parser.parse_args()
    host, port = args.listen
    make_server(args.state_dir, host, port).add_user_offline(
        args.user, password=None, public_keys=[args.key.read_text().strip()], groups=["admin"]
    )

    async def run() -> None:
        server = make_server(args.state_dir, host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve_forever(server, stop)

    run_event_loop(run())


if __name__ == "__main__":
    main()
