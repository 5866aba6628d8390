"""The ingress policy (seed 6.2) and gateway NAT (seed 6.1) for kernels without nf_tables.

nftables (nc_agent.dataplane.ingress_nft) is the policy's home.  Some kernels
build nf_tables without any address family -- the User-Mode Linux kernel of
the lab is one: every `nft add table` answers "Operation not supported" --
but have x_tables.  For them the same policy is rendered, rule for rule, as
iptables-legacy chains of cevpn's own (``CEVPN-*``), replaced atomically per
table by ``iptables-legacy-restore --noflush``; the built-in chains only get
one jump each into them.  IPv4 only: an IPv6 SP address needs nftables.
"""

from __future__ import annotations

import ipaddress
import subprocess

from nc_agent.dataplane.ingress_policy import (
    FORWARD_LOG_PREFIX,
    IKE_PORTS,
    INPUT_LOG_PREFIX,
    AllowRule,
    IngressError,
    IngressPolicy,
)
from nc_agent.dataplane.netns import create_in

CHAINS = {
    "filter": (("INPUT", "CEVPN-INPUT"), ("FORWARD", "CEVPN-FORWARD")),
    "mangle": (("PREROUTING", "CEVPN-PREROUTING"),),
    "nat": (("POSTROUTING", "CEVPN-POSTROUTING"),),
}
LOG_RATE = "5/min"
TIMEOUT = 30.0


def _drop(sp: str, log: bool, prefix: str) -> list[str]:
    rules = [f'-i {sp} -m limit --limit {LOG_RATE} -j LOG --log-prefix "{prefix}"'] if log else []
    return [*rules, f"-i {sp} -j DROP"]


def _allow(rule: AllowRule, sp: str, to_us: str) -> str:
    parts = [f"-i {sp}", to_us, f"-p {rule.protocol}"]
    if rule.source_prefix:
        parts.append(f"-s {rule.source_prefix}")
    if rule.destination_port is not None:
        parts.append(f"--dport {rule.destination_port}")
    return " ".join(parts) + " -j ACCEPT"


def rules(policy: IngressPolicy) -> dict[str, list[str]]:
    """Chain name -> its rules (iptables syntax without '-A CHAIN')."""
    if ipaddress.ip_address(policy.sp_address).version != 4:
        raise IngressError("the iptables backend is IPv4 only: an IPv6 SP address needs nftables")
    if not policy.sp_interface:
        raise ValueError("the SP interface is not resolved")
    sp, to_us = policy.sp_interface, f"-d {policy.sp_address}"
    chains: dict[str, list[str]] = {name: [] for pairs in CHAINS.values() for _, name in pairs}
    gw = policy.gateway
    if policy.enabled:
        chains["CEVPN-INPUT"] = [
            # IP-in-IP must have come inside IPsec, even if conntrack has seen the flow.
            f"-i {sp} {to_us} -p 4 -m policy --dir in --pol none -j DROP",
            f"-i {sp} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            f"-i {sp} {to_us} -p esp -j ACCEPT",
            *(f"-i {sp} {to_us} -p udp --dport {port} -j ACCEPT" for port in IKE_PORTS),
            f"-i {sp} {to_us} -p 4 -m policy --dir in --pol ipsec -j ACCEPT",
            *(
                f"-i {sp} {to_us} -p tcp{f' -s {src}' if src else ''} "
                f"--dport {policy.management_port} -j ACCEPT"
                for src in (policy.management_sources or ("",))
                if not src or ipaddress.ip_network(src, strict=False).version == 4
            ),
            *(_allow(rule, sp, to_us) for rule in policy.allow),
            *_drop(sp, policy.log_drops, INPUT_LOG_PREFIX),
        ]
        forward = []
        if gw is not None:
            forward = [
                f"-i {gw.device} -o {sp} -j ACCEPT",
                f"-i {sp} -o {gw.device} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
            ]
        chains["CEVPN-FORWARD"] = [*forward, *_drop(sp, policy.log_drops, FORWARD_LOG_PREFIX)]
    if gw is not None:
        chains["CEVPN-PREROUTING"] = [
            f"-i {gw.device} -j CONNMARK --set-mark {gw.mark:#x}",
            f"-i {sp} -m connmark --mark {gw.mark:#x} -j MARK --set-mark {gw.mark:#x}",
        ]
        if gw.nat:
            chains["CEVPN-POSTROUTING"] = [
                f"-o {sp} -m connmark --mark {gw.mark:#x} -j SNAT --to-source {policy.sp_address}"
            ]
    return chains


def render(policy: IngressPolicy | None, present: set[str] | None = None) -> str:
    """An iptables-restore --noflush script replacing cevpn's chains (None: empty them),
    with a jump from each built-in chain unless ``present`` (iptables-save lines) has it."""
    chains = rules(policy) if policy is not None else {}
    out: list[str] = []
    for table, pairs in CHAINS.items():
        out.append(f"*{table}")
        out += [f":{name} - [0:0]" for _, name in pairs]  # created, or flushed
        for builtin, name in pairs:
            if present is None or f"-A {builtin} -j {name}" not in present:
                out.append(f"-I {builtin} 1 -j {name}")
        for _, name in pairs:
            out += [f"-A {name} {rule}" for rule in chains.get(name, [])]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


class Iptables:
    """cevpn's chains in the SP space (``sp_netns``; None: the agent's own namespace)."""

    def __init__(self, sp_netns: str | None) -> None:
        self.sp_netns = sp_netns

    def apply(self, policy: IngressPolicy | None) -> None:
        """Two processes whatever the policy (each costs a lot on a slow kernel): one save
        to see which jumps exist, one restore that replaces the chains and adds the
        missing jumps -- atomically per table."""

        def work() -> None:
            saved = _run(["iptables-legacy-save"])
            if saved.returncode != 0:
                raise IngressError(f"iptables-legacy-save: {saved.stderr.strip()}")
            script = render(policy, present=set(saved.stdout.splitlines()))
            done = _run(["iptables-legacy-restore", "--noflush"], script)
            if done.returncode != 0:
                raise IngressError(f"iptables refused the ingress policy: {done.stderr.strip()}")

        create_in(self.sp_netns, work)

    def current(self) -> str:
        """``iptables-legacy-save`` of every table, cevpn's lines only."""

        def work() -> str:
            saved = _run(["iptables-legacy-save"]).stdout
            return "\n".join(line for line in saved.splitlines() if "CEVPN" in line)

        return create_in(self.sp_netns, work)


def _run(argv: list[str], script: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, input=script, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise IngressError(f"cannot run {argv[0]}: {exc}") from exc
