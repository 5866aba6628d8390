"""What one CE agent holds in memory with a full-mesh configuration (``--peers`` peers).

    python -m bench.agent_memory [--peers 999] [--tracemalloc] [--census] [--json FILE]

The agent runs in this process exactly as in a farm of bench/agent_farm.py
(``--dataplane none``, its own NETCONF server and SSH listener); the VPN server's
provisioning exchange is played by a client in another process (so the client's
memory is not counted): ``<discard-changes/>``, an ``<edit-config>`` of the
candidate with every peer, ``<commit><confirmed/>`` with a ``<persist>`` token, then
the confirming ``<commit>`` on a second session, as nc_server/southbound.py does; then
two one-peer changes the same way (two sites added, as in bench/server_bench.py).

Reported: VmRSS (/proc/self/status) after start-up with an empty configuration and
after the configuration is in place (the difference is what one more agent of a farm
costs for its configuration), and with ``--tracemalloc`` the Python heap by file
(tracemalloc started before the agent is built: the start-up's allocations are
counted as well).  lxml's and libyang's C allocations are not seen by tracemalloc;
``--census`` counts the lxml elements of each datastore tree and the sizes of the
serialised documents the agent keeps.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import secrets
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def client(port: int, key: str, host_key: str, peers: int) -> None:
    """The VPN server's side of the exchange (run in its own process)."""
    from bench.agent_commit_bench import config, peer, preconfiguration
    from bench.thin_client import ThinNetconfClient

    a = ThinNetconfClient.connect("127.0.0.1", port, "bench", key, host_key, timeout=600)
    b = ThinNetconfClient.connect("127.0.0.1", port, "bench", key, host_key, timeout=600)
    pub = Path(key + ".pub").read_text().strip()
    a.rpc_ok(
        f"<edit-config><target><running/></target>{config(preconfiguration(pub))}</edit-config>",
        timeout=600,
    )
    token = secrets.token_hex(16)
    a.rpc_ok("<discard-changes/>")
    body = "".join(peer(i) for i in range(peers))
    a.rpc_ok(f"<edit-config><target><candidate/></target>{config(body)}</edit-config>", timeout=600)
    a.rpc_ok(
        "<commit><confirmed/><confirm-timeout>120</confirm-timeout>"
        f"<persist>{token}</persist></commit>",
        timeout=600,
    )
    b.rpc_ok(f"<commit><persist-id>{token}</persist-id></commit>", timeout=600)
    for extra in (peers, peers + 1):  # then two sites added, one peer each (steps B, C)
        token = secrets.token_hex(16)
        a.rpc_ok("<discard-changes/>")
        a.rpc_ok(f"<edit-config><target><candidate/></target>{config(peer(extra))}</edit-config>")
        a.rpc_ok(
            "<commit><confirmed/><confirm-timeout>120</confirm-timeout>"
            f"<persist>{token}</persist></commit>"
        )
        b.rpc_ok(f"<commit><persist-id>{token}</persist-id></commit>")
    a.close()
    b.close()


def census(server: Any) -> dict[str, Any]:
    """What the server and its validator keep of the configuration."""
    out: dict[str, Any] = {}
    for name, store in server.datastores.items():
        out[f"elements_{name}"] = sum(1 for _ in store.root.iter())
    roots = {id(s.root) for s in server.datastores.values()}
    out["distinct_datastore_roots"] = len(roots)
    counts: dict[str, int] = {}
    big_bytes = 0
    for obj in gc.get_objects():
        name = type(obj).__name__
        counts[name] = counts.get(name, 0) + 1
    for obj in gc.get_referents(*gc.get_objects()):
        if isinstance(obj, bytes) and len(obj) > 100_000:
            big_bytes += len(obj)
    out["gc_objects"] = sum(counts.values())
    out["top_types"] = sorted(counts.items(), key=lambda kv: -kv[1])[:15]
    out["bytes_over_100k_total_mb"] = big_bytes / 2**20
    return out


def in_use_mb() -> float:
    """Bytes glibc's malloc has handed out and not had back, all arenas (mallinfo2)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]  # fmt: skip

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return float(info.uordblks + info.hblkhd) / 2**20


def probe(server: Any) -> dict[str, float]:
    """The cost of one more copy of each form of the configuration (malloc in use)."""
    from copy import deepcopy

    from lxml import etree

    from nc_core.datastore import document_bytes

    out: dict[str, float] = {"in_use_mb": in_use_mb()}
    running = server.datastores["running"]
    base = in_use_mb()
    copy = deepcopy(running.root)
    out["lxml_copy_mb"] = in_use_mb() - base
    del copy
    base = in_use_mb()
    data = document_bytes(running.root)
    out["document_bytes_mb"] = in_use_mb() - base
    base = in_use_mb()
    parsed = etree.fromstring(data)
    out["lxml_parsed_mb"] = in_use_mb() - base
    del parsed
    del data
    tree = running.tree
    if tree is not None:
        base = in_use_mb()
        dup = (
            tree.duplicate(with_siblings=True, recursive=True)
            if hasattr(tree, "duplicate")
            else None
        )
        out["libyang_copy_mb"] = in_use_mb() - base
        if dup is not None:
            dup.free()
    out["holders"] = {  # type: ignore[assignment]
        "running_is_candidate": running.root is server.datastores["candidate"].root,
        "candidate_tree": server.datastores["candidate"].tree is not None,
        "spare": server._spare is not None,
        "running_document": server._running_document is not None,
        "validations": dict(server.validator.counts),
        "spare_copies": server.spare_copies,
    }
    return out


async def agent(
    peers: int, agents: int, work: Path, trace: bool, with_census: bool
) -> dict[str, Any]:
    from nc_agent.application import AgentApplication
    from nc_core.server import NetconfServer, ServerOptions
    from nc_core.transport_ssh import Listener, host_key_line
    from nc_server.enrolment import new_ed25519

    result: dict[str, Any] = {"peers": peers, "agents": agents, "rss_mb_imports": rss_mb()}
    pair = new_ed25519("bench")
    key = work / "bench_key"
    key.write_text(pair.private_openssh)
    key.chmod(0o600)
    (work / "bench_key.pub").write_text(pair.public_line + "\n")
    if trace:
        tracemalloc.start(1)
    servers: list[tuple[NetconfServer, Listener, int, str]] = []
    for n in range(agents):
        state_dir = work / f"ce-{n}"
        state_dir.mkdir(mode=0o700)
        port = _free_port()
        NetconfServer(
            ServerOptions(state_dir=state_dir), AgentApplication(state_dir, None)
        ).add_user_offline("bench", password=None, public_keys=[pair.public_line],
                           groups=["admin"])  # fmt: skip
        app = AgentApplication(state_dir, None, dataplane="none")
        server = NetconfServer(ServerOptions(state_dir=state_dir, host="127.0.0.1", port=port), app)
        await server.load()
        listener = Listener(server)
        server.listener = listener
        await listener.start()
        await app.started()
        servers.append((server, listener, port, host_key_line(state_dir)))
    await asyncio.sleep(0.5)
    gc.collect()
    result["rss_mb_empty"] = rss_mb()
    result["in_use_mb_empty"] = in_use_mb()
    before = tracemalloc.take_snapshot() if trace else None
    started = time.perf_counter()
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.agent_memory",
            "--client",
            str(port),
            str(key),
            host_key,
            str(peers),
            cwd=ROOT,
        )
        for _, _, port, host_key in servers
    ]
    for proc in procs:
        if await proc.wait() != 0:
            raise RuntimeError("a client failed")
    result["push_s"] = time.perf_counter() - started
    await asyncio.sleep(1.0)  # what the last exchange left behind is released
    gc.collect()
    result["rss_mb_loaded"] = rss_mb()
    result["in_use_mb_loaded"] = in_use_mb()
    result["rss_mb_per_agent"] = (result["rss_mb_loaded"] - result["rss_mb_empty"]) / agents
    result["in_use_mb_per_agent"] = (
        result["in_use_mb_loaded"] - result["in_use_mb_empty"]
    ) / agents
    # Idle: the configuration the last commit replaced is let go (ServerOptions).
    await asyncio.sleep(ServerOptions.spare_keep_seconds)
    gc.collect()
    result["rss_mb_per_agent_idle"] = (rss_mb() - result["rss_mb_empty"]) / agents
    result["in_use_mb_per_agent_idle"] = (in_use_mb() - result["in_use_mb_empty"]) / agents
    server = servers[0][0]
    if trace:
        after = tracemalloc.take_snapshot()
        assert before is not None
        result["traced_mb_total"] = sum(s.size for s in after.statistics("filename")) / 2**20
        result["traced_mb_growth"] = (
            sum(d.size_diff for d in after.compare_to(before, "filename")) / 2**20
        )
        result["traced_by_file_growth"] = [
            (str(d.traceback), round(d.size_diff / 2**20, 3), d.count_diff)
            for d in after.compare_to(before, "filename")[:20]
        ]
        result["traced_by_line_growth"] = [
            (str(d.traceback), round(d.size_diff / 2**20, 3), d.count_diff)
            for d in after.compare_to(before, "lineno")[:25]
        ]
        result["traced_by_file_total"] = [
            (str(s.traceback), round(s.size / 2**20, 3), s.count)
            for s in after.statistics("filename")[:20]
        ]
    if with_census:
        result["census"] = census(server)
    if os.environ.get("AGENT_MEMORY_PROBE"):
        result["probe"] = probe(server)
    if os.environ.get("AGENT_MEMORY_TRIM"):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        result["rss_mb_after_trim"] = rss_mb()
    for server, listener, _, _ in servers:
        listener.close()
        await server.app.stopping()
        server.close()
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client(int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=999)
    parser.add_argument("--agents", type=int, default=1, help="in this process, as a farm")
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--census", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR)
    import uvloop

    with tempfile.TemporaryDirectory(prefix="cevpn-agent-memory-") as tmp:
        os.chmod(tmp, 0o700)
        result = uvloop.run(
            agent(args.peers, args.agents, Path(tmp), args.tracemalloc, args.census)
        )
    print(json.dumps(result, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
