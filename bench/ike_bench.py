"""Commit to all IKE tunnels up, 50 peers: the cevpn agent against swanctl --load-all.

    .venv/bin/python bench/ike_bench.py [--peers 50] [--rounds 3] [--json out.json]

On the host this boots one UML guest (lab/uml.py) that runs
bench/ike_bench_guest.py in netns `pe` and prints the guest's result.  In the
guest (lab.topology, 2 sites):

- ce1 (198.51.100.2) is the CE under test.  Its 50 peers are 203.0.113.65..114,
  all owned by ce2 and answered by ONE responder charon there (its own
  strongswan.conf from nc_agent.ike.charon.render_conf; 50 mirrored PSK
  connections loaded over VICI, never initiating).  pe routes 203.0.113.64/26
  to ce2 (not the low end of 203.0.113.0/24: pe owns .1 and `inet` .10, and
  peer-01 at .1 was answered by pe itself).  ce1 has the lower address of
  every pair, so the agent leads (initiates at once).  All 50
  IKE_SA_INITs reach the responder from one address, so the
  per-address cookie threshold matters: render_conf raises it (a default of 3
  drew COOKIE replies and once cost a whole 18 s retransmit).  The responder is
  restarted fresh, and the kernel state of ce1, ce1-vpn and ce2 flushed,
  before every run.
- agent: `cevpn-agent` for ce1 (as lab/agents.Agent starts it,
  fresh state directory each run).  The clock starts when ONE <edit-config>
  (pre-configuration + 50 IKE peers: permanent, transport-ipip, PSK) is sent
  and stops when charon on ce1 has, for every peer, an ESTABLISHED IKE_SA with
  an INSTALLED CHILD_SA (VICI list-sas polled every 50 ms).  That includes
  everything the agent does for a first configuration: NETCONF, validation,
  persistence, the guard policy, 50 IP-in-IP devices and their routes,
  loading 50 connections and initiating them (charon itself starts with the
  agent, before the clock, as the reference's does).  The RPC's own
  duration and the agent's <get> view afterwards (all 50 `up`) are recorded.
- swanctl (reference): a bare charon for ce1, started the way the agent starts
  it (same strongswan.conf, checked), then `swanctl --load-all` of a
  swanctl.conf holding the SAME 50 connections (written from the agent's own
  IkePeer.vici_connection() / vici_shared_key(), compiled from the same XML by
  compile_desired; checked afterwards by comparing list-conns of both charons)
  with start_action = start, the plain swanctl way to bring tunnels up at load.
  The clock runs from starting swanctl to the same condition.  charon's own
  start-up is timed separately and shown beside it (neither figure includes
  it).

Runs alternate agent, swanctl, agent, ... (--rounds each); the ratio is of the
medians, and also given within each round (an agent run and the swanctl run
right after it see about the same load from other lab guests on the host). Also
printed, to explain the ratio: when charon's VICI socket first answered, the
first IKE_SA appeared, the first and the last tunnel came up, and the CPU
seconds the agent (or swanctl), the CE's charon and the responder used until
then. Both ends run in one UML guest on a 2-core host, so the responder's CPU
is inside both measurements alike, and lab guests of others running at the same
time show up as noise (the host load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _median(runs: list[dict[str, Any]], kind: str, key: str) -> float | None:
    values = [r[key] for r in runs if r["kind"] == kind and r.get(key) is not None]
    return statistics.median(values) if values else None


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    runs = res["runs"]
    agent = _median(runs, "agent", "all_up_s")
    swanctl = _median(runs, "swanctl", "all_up_s")
    start = _median(runs, "swanctl", "charon_start_s")
    complete = all(r.get("all_up_s") is not None for r in runs)
    summary: dict[str, Any] = {
        "complete": complete,
        "agent_all_up_s": agent,
        "agent_rpc_s": _median(runs, "agent", "rpc_s"),
        "swanctl_all_up_s": swanctl,
        "swanctl_process_s": _median(runs, "swanctl", "swanctl_s"),
        "charon_start_s": start,
    }
    keys = ("charon_reachable_s", "first_ike_sa_s", "first_up_s", "all_up_s")
    summary["timeline"] = {
        kind: {key: _median(runs, kind, key) for key in keys} for kind in ("agent", "swanctl")
    }
    summary["cpu_s"] = {}
    for kind in ("agent", "swanctl"):
        cpus = [r["cpu_s"] for r in runs if r["kind"] == kind and "cpu_s" in r]
        if cpus:
            summary["cpu_s"][kind] = {
                proc: round(statistics.median(c[proc] for c in cpus), 2) for proc in cpus[0]
            }
    if agent and swanctl:
        summary["ratio"] = round(agent / swanctl, 2)
    # Each agent run and the swanctl run right after it share the host's load of the
    # moment (other lab guests on the same 2 cores): the ratio within a round is less
    # noisy than the ratio of the medians.
    pairs = [
        a["all_up_s"] / b["all_up_s"]
        for a in runs
        for b in runs
        if a["kind"] == "agent" and b["kind"] == "swanctl" and a["run"] == b["run"]
        if a.get("all_up_s") and b.get("all_up_s")
    ]
    if pairs:
        summary["round_ratios"] = [round(r, 2) for r in pairs]
        summary["median_round_ratio"] = round(statistics.median(pairs), 2)
    return summary


def report(res: dict[str, Any]) -> str:
    s = res["summary"]
    n, rounds = res["peers"], res["rounds"]

    def sec(value: float | None) -> str:
        return "  n/a" if value is None else f"{value:5.2f}"

    lines = [
        f"{n} peers, commit -> all tunnels up (UML guest, median of {rounds}):",
        f"  cevpn agent {sec(s['agent_all_up_s'])} s | swanctl --load-all "
        f"{sec(s['swanctl_all_up_s'])} s | ratio {s.get('ratio', 'n/a')}",
        f"  ratio within each round {s.get('round_ratios', 'n/a')}, median "
        f"{s.get('median_round_ratio', 'n/a')}",
        f"  (charon's own start, before either clock: {sec(s['charon_start_s'])} s)",
        f"  agent: edit-config RPC returned after {sec(s['agent_rpc_s'])} s; "
        f"swanctl process took {sec(s['swanctl_process_s'])} s",
        "  timeline, medians (s after commit / after starting swanctl):",
        *(
            f"    {kind:<8} charon reachable {sec(t['charon_reachable_s'])}  first IKE_SA "
            f"{sec(t['first_ike_sa_s'])}  first up {sec(t['first_up_s'])}  all up "
            f"{sec(t['all_up_s'])}"
            for kind, t in s["timeline"].items()
        ),
        "  CPU seconds until all up (charon: since its start), medians: "
        + " | ".join(
            f"{kind}: " + ", ".join(f"{proc} {value:.2f}" for proc, value in cpu.items())
            for kind, cpu in s["cpu_s"].items()
        ),
        "",
        "    run  kind     all up  first up  rpc/swanctl  charon start   up  kernel SAs  <get> up",
    ]
    for r in res["runs"]:
        step = r.get("rpc_s") if r["kind"] == "agent" else r.get("swanctl_s")
        charon = sec(r["charon_start_s"]) if "charon_start_s" in r else "    -"
        cells = [
            f"{r['run']:>5}",
            f"{r['kind']:<7}",
            f"{sec(r.get('all_up_s')):>6}",
            f"{sec(r.get('first_up_s')):>8}",
            f"{sec(step):>11}",
            f"{charon:>12}",
            f"{r.get('up'):>3}",
            f"{r.get('kernel_sas'):>10}",
            f"{r.get('agent_view_up', '-'):>8}",
        ]
        lines.append("  ".join(cells))
    lines += [
        "",
        "  same connections in both charons (list-conns): "
        f"{res['same_connections']}; same strongswan.conf: {res['same_strongswan_conf']}",
    ]
    for r in res["runs"]:
        if r.get("not_up"):
            lines.append(f"  run {r['run']} {r['kind']}: not up: {r['not_up']}")
    if not s["complete"]:
        lines.append("  INCOMPLETE: some run did not bring every tunnel up (see not_up)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3, help="runs of each, alternating")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not 1 <= args.peers <= 62:
        ap.error("--peers must be 1..62 (203.0.113.64/26)")
    if args.in_guest:
        from bench.ike_bench_guest import main as guest_main

        guest_main(args.peers, args.rounds)
        return
    from lab.uml import run_guest

    load = os.getloadavg()
    result = run_guest(
        f"""
        set -e
        .venv/bin/python -m lab.topology build 2 >/dev/null
        ip netns exec pe .venv/bin/python bench/ike_bench.py --in-guest \\
            --peers {args.peers} --rounds {args.rounds}
        """,
        timeout=900,
    )
    if result.returncode != 0:
        sys.exit(f"guest failed ({result.returncode}):\n{result.console[-4000:]}")
    res = json.loads(result.read("ike_bench.json"))
    res["summary"] = summarise(res)
    res["host_loadavg_at_start"] = [round(x, 2) for x in load]
    res["guest_workdir"] = str(result.workdir)
    end = os.getloadavg()
    res["host_loadavg_at_end"] = [round(x, 2) for x in end]
    print(report(res))
    print(
        f"  host load average (1 min) at start {load[0]:.2f}, at end {end[0]:.2f}; "
        f"guest work dir (logs) {result.workdir}"
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
