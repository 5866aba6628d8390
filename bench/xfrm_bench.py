"""Bulk XFRM install: nc_agent.dataplane.xfrm against `ip -batch`, in the lab guest.

    .venv/bin/python bench/xfrm_bench.py [--peers 1000] [--batch 100] [--json out.json]

On the host this boots a UML guest (lab/uml.py) that runs itself with
--in-guest and prints the guest's result.  In the guest, in a fresh netns:

1. encoding only: 2,000 XFRM_MSG_NEWSA + 2,000 XFRM_MSG_NEWPOLICY encoded by
   pyroute2 message classes (defined below on pyroute2's nlmsg/nla) and by the
   module's `struct` encoders (bytes checked identical);
2. the same install sent over the same batched socket with pyroute2-encoded
   messages (so only the encoder differs);
3. `Xfrm.apply` installing N peers (2 SAs + 2 policies each, transport mode,
   proto 4, distinct addresses) in applies of --batch peers; then flush_owned;
4. the same objects with one `ip -batch` file; flush.

Every rate is printed next to the `ip -batch` reference and as a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nc_agent.dataplane import xfrm as X  # noqa: E402

NS = "xbench"
GCM = "rfc4106(gcm(aes))"
R = X.OWNED_REQIDS.start
LOCAL = "192.0.2.1"


def peer_addr(i: int) -> str:
    return f"100.{64 + i // 65536}.{(i // 256) % 256}.{i % 256 + 0}"


def objects(peers: int) -> list[tuple[list[X.SA], list[X.Policy]]]:
    out = []
    for i in range(peers):
        remote = peer_addr(i)
        k_out = (i.to_bytes(4, "big") + b"o") * 7 + b"o"
        k_in = (i.to_bytes(4, "big") + b"i") * 7 + b"i"
        sas = [
            X.SA(
                LOCAL, remote, 0x100000 + i, R + i, "transport", aead=X.Algorithm(GCM, k_out, 128)
            ),
            X.SA(remote, LOCAL, 0x200000 + i, R + i, "transport", aead=X.Algorithm(GCM, k_in, 128)),
        ]
        policies = [
            X.Policy("out", f"{LOCAL}/32", f"{remote}/32", 4, reqid=R + i),
            X.Policy("in", f"{remote}/32", f"{LOCAL}/32", 4, reqid=R + i),
        ]
        out.append((sas, policies))
    return out


def ip_batch_lines(objs: list[tuple[list[X.SA], list[X.Policy]]]) -> list[str]:
    lines = []
    for sas, policies in objs:
        for sa in sas:
            assert sa.aead is not None
            lines.append(
                f"xfrm state add src {sa.src} dst {sa.dst} proto esp spi {sa.spi:#x} "
                f"reqid {sa.reqid} mode transport aead {GCM} 0x{sa.aead.key.hex()} 128 "
                f"replay-window {sa.replay_window}"
            )
        for p in policies:
            lines.append(
                f"xfrm policy add dir {p.direction} src {p.src} dst {p.dst} proto 4 "
                f"tmpl proto esp reqid {p.reqid} mode transport"
            )
    return lines


# ----------------------------------------------- pyroute2 message classes
def pyroute2_encoders() -> tuple[Any, Any]:
    """XFRM_MSG_NEWSA / NEWPOLICY defined on pyroute2's netlink classes."""
    from pyroute2.netlink import nla, nlmsg

    sel_fields = (
        ("sel_daddr", "16s"),
        ("sel_saddr", "16s"),
        ("sel_dport", "H"),
        ("sel_dport_mask", "H"),
        ("sel_sport", "H"),
        ("sel_sport_mask", "H"),
        ("sel_family", "H"),
        ("sel_prefixlen_d", "B"),
        ("sel_prefixlen_s", "B"),
        ("sel_proto", "B"),
        ("__pad_sel", "3x"),
        ("sel_ifindex", "i"),
        ("sel_user", "I"),
    )
    lft_fields = tuple(
        (f"lft_{n}", "Q")
        for n in (
            "soft_byte_limit",
            "hard_byte_limit",
            "soft_packet_limit",
            "hard_packet_limit",
            "soft_add_expires_seconds",
            "hard_add_expires_seconds",
            "soft_use_expires_seconds",
            "hard_use_expires_seconds",
        )
    )
    cur_fields = tuple((f"curlft_{n}", "Q") for n in ("bytes", "packets", "add_time", "use_time"))

    class xfrm_mark(nla):
        fields = (("value", "I"), ("mask", "I"))

    class xfrm_algo_aead(nla):
        fields = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_icv_len", "I"), ("alg_key", "s"))

    class xfrm_replay_esn(nla):
        fields = (
            ("bmp_len", "I"),
            ("oseq", "I"),
            ("seq", "I"),
            ("oseq_hi", "I"),
            ("seq_hi", "I"),
            ("replay_window", "I"),
            ("bmp", "s"),
        )

    class xfrm_user_tmpl(nla):
        fields = (
            ("id_daddr", "16s"),
            ("id_spi", ">I"),
            ("id_proto", "B"),
            ("__pad1", "3x"),
            ("family", "H"),
            ("__pad2", "2x"),
            ("saddr", "16s"),
            ("reqid", "I"),
            ("mode", "B"),
            ("share", "B"),
            ("optional", "B"),
            ("__pad3", "x"),
            ("aalgos", "I"),
            ("ealgos", "I"),
            ("calgos", "I"),
        )

    class xfrm_usersa_info(nlmsg):
        fields = (
            *sel_fields,
            ("id_daddr", "16s"),
            ("id_spi", ">I"),
            ("id_proto", "B"),
            ("__pad_id", "3x"),
            ("saddr", "16s"),
            *lft_fields,
            *cur_fields,
            ("stats_replay_window", "I"),
            ("stats_replay", "I"),
            ("stats_integrity_failed", "I"),
            ("seq", "I"),
            ("reqid", "I"),
            ("family", "H"),
            ("mode", "B"),
            ("replay_window", "B"),
            ("flags", "B"),
            ("__pad", "7x"),
        )
        nla_map = (
            (18, "XFRMA_ALG_AEAD", "xfrm_algo_aead"),
            (21, "XFRMA_MARK", "xfrm_mark"),
            (23, "XFRMA_REPLAY_ESN_VAL", "xfrm_replay_esn"),
        )

    class xfrm_userpolicy_info(nlmsg):
        fields = (
            *sel_fields,
            *lft_fields,
            *cur_fields,
            ("priority", "I"),
            ("index", "I"),
            ("dir", "B"),
            ("action", "B"),
            ("flags", "B"),
            ("share", "B"),
            ("__pad", "4x"),
        )
        nla_map = ((5, "XFRMA_TMPL", "xfrm_user_tmpl"), (21, "XFRMA_MARK", "xfrm_mark"))

    # nla_map names resolve to attributes of the message class
    xfrm_usersa_info.xfrm_algo_aead = xfrm_algo_aead  # type: ignore[attr-defined]
    xfrm_usersa_info.xfrm_mark = xfrm_mark  # type: ignore[attr-defined]
    xfrm_usersa_info.xfrm_replay_esn = xfrm_replay_esn  # type: ignore[attr-defined]
    xfrm_userpolicy_info.xfrm_user_tmpl = xfrm_user_tmpl  # type: ignore[attr-defined]
    xfrm_userpolicy_info.xfrm_mark = xfrm_mark  # type: ignore[attr-defined]
    inf = X.XFRM_INF
    no_limits = {f: inf for f, _ in lft_fields[:4]}

    def encode_sa(sa: X.SA, seq: int) -> bytes:
        assert sa.aead is not None
        msg = xfrm_usersa_info()
        msg["header"]["type"] = X.XFRM_MSG_NEWSA
        msg["header"]["flags"] = X.NLM_F_REQUEST | X.NLM_F_ACK
        msg["header"]["sequence_number"] = seq
        msg.update(no_limits)
        msg["sel_daddr"] = msg["sel_saddr"] = bytes(16)
        msg["id_daddr"] = X._addr(sa.dst)
        msg["id_spi"] = sa.spi
        msg["id_proto"] = X.IPPROTO_ESP
        msg["saddr"] = X._addr(sa.src)
        msg["reqid"] = sa.reqid
        msg["family"] = 2
        msg["mode"] = X.MODES[sa.mode]
        words = (sa.replay_window + 31) // 32
        msg["attrs"] = [
            (
                "XFRMA_ALG_AEAD",
                {
                    "alg_name": sa.aead.name.encode(),
                    "alg_key_len": len(sa.aead.key) * 8,
                    "alg_icv_len": sa.aead.bits,
                    "alg_key": sa.aead.key,
                },
            ),
            (
                "XFRMA_REPLAY_ESN_VAL",
                {"bmp_len": words, "replay_window": sa.replay_window, "bmp": bytes(4 * words)},
            ),
        ]
        msg.encode()
        return bytes(msg.data)

    def encode_policy(p: X.Policy, seq: int) -> bytes:
        msg = xfrm_userpolicy_info()
        msg["header"]["type"] = X.XFRM_MSG_NEWPOLICY
        msg["header"]["flags"] = X.NLM_F_REQUEST | X.NLM_F_ACK
        msg["header"]["sequence_number"] = seq
        msg.update(no_limits)
        src, splen = p.src.split("/")
        dst, dplen = p.dst.split("/")
        msg["sel_daddr"] = X._addr(dst)
        msg["sel_saddr"] = X._addr(src)
        msg["sel_family"] = 2
        msg["sel_prefixlen_d"] = int(dplen)
        msg["sel_prefixlen_s"] = int(splen)
        msg["sel_proto"] = p.proto
        msg["priority"] = p.priority
        msg["dir"] = X.DIRECTIONS[p.direction]
        msg["attrs"] = [
            (
                "XFRMA_TMPL",
                {
                    "id_daddr": bytes(16),
                    "id_proto": X.IPPROTO_ESP,
                    "family": 2,
                    "saddr": bytes(16),
                    "reqid": p.reqid,
                    "mode": X.MODES[p.mode],
                    "aalgos": 0xFFFFFFFF,
                    "ealgos": 0xFFFFFFFF,
                    "calgos": 0xFFFFFFFF,
                },
            )
        ]
        msg.encode()
        return bytes(msg.data)

    return encode_sa, encode_policy


# ---------------------------------------------------------------- in guest
def sh(*argv: str, stdin: str | None = None) -> None:
    subprocess.run(argv, input=stdin, text=True, check=True, capture_output=True)


def fresh_netns() -> None:
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    sh("ip", "netns", "add", NS)


def in_guest(peers: int, batch: int) -> dict[str, Any]:
    objs = objects(peers)
    sas = [sa for s, _ in objs for sa in s]
    policies = [p for _, ps in objs for p in ps]
    n_sa, n_obj = len(sas), len(sas) + len(policies)
    res: dict[str, Any] = {"peers": peers, "sas": n_sa, "objects": n_obj, "batch_peers": batch}

    # 1. encoding only
    enc_sa, enc_pol = pyroute2_encoders()
    t0 = time.perf_counter()
    p2 = [enc_sa(sa, 0) for sa in sas] + [enc_pol(p, 0) for p in policies]
    t_p2 = time.perf_counter() - t0
    t0 = time.perf_counter()
    mine = [X.encode_newsa(sa, 0) for sa in sas] + [X.encode_newpolicy(p, 0) for p in policies]
    t_struct = time.perf_counter() - t0
    res["encode"] = {
        "pyroute2_msgs_per_s": round(n_obj / t_p2),
        "struct_msgs_per_s": round(n_obj / t_struct),
        "speedup": round(t_p2 / t_struct, 1),
        "identical_bytes": p2 == mine,
    }

    # 2. pyroute2-encoded messages over the same batched socket
    fresh_netns()
    x = X.Xfrm(NS)
    t0 = time.perf_counter()
    for i in range(0, peers, batch):
        chunk = objs[i : i + batch]
        ops = [X._Op("adding", sa, enc_sa(sa, 0)) for s, _ in chunk for sa in s]
        ops += [X._Op("adding", p, enc_pol(p, 0)) for _, ps in chunk for p in ps]
        out = x._run(ops)
        assert out.failed is None, out.failed
    t_p2_install = time.perf_counter() - t0
    assert len(x.dump_sas()) == n_sa
    x.close()

    # 3. Xfrm.apply (struct encoding), in applies of `batch` peers
    fresh_netns()
    x = X.Xfrm(NS)
    t0 = time.perf_counter()
    for i in range(0, peers, batch):
        chunk = objs[i : i + batch]
        x.apply(
            add_sas=[sa for s, _ in chunk for sa in s],
            add_policies=[p for _, ps in chunk for p in ps],
        )
    t_apply = time.perf_counter() - t0
    got_sas, got_pol = len(x.dump_sas()), len(x.dump_policies())
    assert (got_sas, got_pol) == (n_sa, len(policies)), (got_sas, got_pol)
    t0 = time.perf_counter()
    flushed = x.flush_owned()
    t_flush = time.perf_counter() - t0
    assert flushed == n_obj, flushed
    x.close()

    # 4. ip -batch, the reference
    fresh_netns()
    with tempfile.NamedTemporaryFile("w", suffix=".batch", delete=False) as f:
        f.write("\n".join(ip_batch_lines(objs)) + "\n")
    t0 = time.perf_counter()
    sh("ip", "-n", NS, "-batch", f.name)
    t_ip = time.perf_counter() - t0
    os.unlink(f.name)
    x = X.Xfrm(NS)
    assert len(x.dump_sas()) == n_sa and len(x.dump_policies()) == len(policies)
    x.close()

    def rates(seconds: float) -> dict[str, float]:
        return {
            "seconds": round(seconds, 3),
            "sas_per_s": round(n_sa / seconds),
            "objects_per_s": round(n_obj / seconds),
            "vs_ip_batch": round(t_ip / seconds, 2),
        }

    res["xfrm_apply"] = rates(t_apply)
    res["pyroute2_encoded_batched"] = rates(t_p2_install)
    res["ip_batch"] = rates(t_ip)
    res["flush_owned"] = {"seconds": round(t_flush, 3), "objects_per_s": round(n_obj / t_flush)}
    return res


def report(res: dict[str, Any]) -> str:
    ip = res["ip_batch"]
    lines = [
        f"{res['peers']} peers = {res['sas']} SAs + {res['objects'] - res['sas']} policies "
        f"(applies of {res['batch_peers']} peers), UML guest",
        f"  ip -batch (reference)       {ip['sas_per_s']:>7} SAs/s {ip['objects_per_s']:>7} obj/s"
        f"  {ip['seconds']:.3f} s",
    ]
    for key, label in (
        ("xfrm_apply", "Xfrm.apply (struct)"),
        ("pyroute2_encoded_batched", "pyroute2-encoded, batched"),
    ):
        r = res[key]
        lines.append(
            f"  {label:<27} {r['sas_per_s']:>7} SAs/s {r['objects_per_s']:>7} obj/s"
            f"  {r['seconds']:.3f} s  = {r['vs_ip_batch']}x ip -batch"
        )
    e = res["encode"]
    lines.append(
        f"  encoding only: pyroute2 classes {e['pyroute2_msgs_per_s']} msg/s, struct "
        f"{e['struct_msgs_per_s']} msg/s ({e['speedup']}x; identical bytes: {e['identical_bytes']})"
    )
    lines.append(f"  flush_owned: {res['flush_owned']['objects_per_s']} obj/s")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=100, help="peers per Xfrm.apply")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.in_guest:
        res = in_guest(args.peers, args.batch)
        Path(os.environ["WORK"], "xfrm_bench.json").write_text(json.dumps(res, indent=1))
        return
    from lab.uml import run_guest

    result = run_guest(
        f".venv/bin/python bench/xfrm_bench.py --in-guest --peers {args.peers} "
        f"--batch {args.batch}\n",
        timeout=600,
    )
    if result.returncode != 0:
        sys.exit(f"guest failed ({result.returncode}):\n{result.console[-4000:]}")
    res = json.loads(result.read("xfrm_bench.json"))
    print(report(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
