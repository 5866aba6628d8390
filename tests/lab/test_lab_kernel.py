"""The lab itself: a UML guest builds the topology and carries ESP between sites.

These tests set up IPsec by hand with `ip xfrm`, exactly as LAB.md describes,
to prove the kernel lab the agent's lab tests run in (issue 4).
"""

from __future__ import annotations

import pytest

from lab.uml import run_guest

pytestmark = pytest.mark.lab


KEY_AB = "0x" + "11" * 36
KEY_BA = "0x" + "22" * 36


def test_two_sites_ping_through_tunnel_mode_esp_and_the_core_sees_only_esp():
    result = run_guest(
        f"""
        set -e
        .venv/bin/python -m lab.topology build 2
        A=198.51.100.2; B=198.51.100.6
        # route-based tunnel mode (LAB.md): a VTI per peer in the SP space, moved to the VPN space
        for pair in "ce1 $A $B 12 {KEY_AB} {KEY_BA} 2" "ce2 $B $A 12 {KEY_BA} {KEY_AB} 1"; do
          set -- $pair
          ns=$1 l=$2 r=$3 mark=$4 kout=$5 kin=$6 peer=$7
          ip -n $ns link add vti$peer type vti local $l remote $r ikey $mark okey $mark
          ip -n $ns xfrm state add src $l dst $r proto esp spi 0x$mark$peer mode tunnel \\
            aead 'rfc4106(gcm(aes))' $kout 128 replay-window 128 mark $mark
          ip -n $ns xfrm state add src $r dst $l proto esp spi 0x$mark$((3-peer)) mode tunnel \\
            aead 'rfc4106(gcm(aes))' $kin 128 replay-window 128 mark $mark
          ip -n $ns xfrm policy add dir out mark $mark tmpl src $l dst $r proto esp mode tunnel
          ip -n $ns xfrm policy add dir in mark $mark tmpl src $r dst $l proto esp mode tunnel
          ip -n $ns link set vti$peer netns $ns-vpn
          ip -n $ns-vpn link set vti$peer up
          ip -n $ns-vpn route add 10.$peer.0.0/24 dev vti$peer
        done
        ip netns exec pe tcpdump -nni any -w $WORK/pe.pcap --immediate-mode >/dev/null 2>&1 &
        sleep 1
        ip netns exec site1 ping -c 3 -W 2 10.2.0.2
        sleep 1
        kill %1; wait %1 || true
        tcpdump -nn -r $WORK/pe.pcap ip > $WORK/pe.txt 2>/dev/null
        ip -n ce1 -s xfrm state > $WORK/ce1-states.txt
        ip -n pe route > $WORK/pe-routes.txt
        """,
        timeout=180,
    )
    assert result.returncode == 0, result.console[-3000:]
    assert " 0% packet loss" in result.console
    captured = result.read("pe.txt").strip().splitlines()  # every IPv4 packet pe saw
    assert captured, "the capture on pe saw nothing"
    assert all("ESP(spi=" in line for line in captured), captured
    assert not any(" 10." in line for line in captured)
    assert "10." not in result.read("pe-routes.txt")
    assert "3(packets)" in result.read("ce1-states.txt")


def test_a_missing_sa_drops_traffic_instead_of_sending_it_in_clear():
    result = run_guest(
        """
        set -e
        .venv/bin/python -m lab.topology build 2
        A=198.51.100.2; B=198.51.100.6
        ip -n ce1 link add vti2 type vti local $A remote $B ikey 12 okey 12
        ip -n ce1 xfrm policy add dir out mark 12 tmpl src $A dst $B proto esp mode tunnel
        ip -n ce1 link set vti2 netns ce1-vpn
        ip -n ce1-vpn link set vti2 up
        ip -n ce1-vpn route add 10.2.0.0/24 dev vti2
        ip netns exec pe tcpdump -nni any -w $WORK/pe.pcap --immediate-mode >/dev/null 2>&1 &
        sleep 1
        ! ip netns exec site1 ping -c 2 -W 1 10.2.0.2
        sleep 1
        kill %1; wait %1 || true
        tcpdump -nn -r $WORK/pe.pcap ip > $WORK/pe.txt 2>/dev/null
        ip netns exec ce1 cat /proc/net/xfrm_stat > $WORK/xfrm_stat.txt
        """,
        timeout=180,
    )
    assert result.returncode == 0, result.console[-3000:]
    assert result.read("pe.txt").strip() == ""  # nothing left the CE, in clear or otherwise
    stats = dict(line.split() for line in result.read("xfrm_stat.txt").splitlines())
    assert int(stats["XfrmOutNoStates"]) >= 2
