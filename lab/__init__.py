"""The User-Mode Linux lab harness: a real kernel with ESP, IP-in-IP and VTI for the CE data
plane, which the host kernel lacks (../shared/LAB.md).

- :mod:`lab.uml` boots a guest on the host's file system and runs a script in it;
- :mod:`lab.topology` builds the network inside: provider core ``pe``, CEs, VPN
  spaces, site hosts, the Internet host;
- :mod:`lab.agents` runs real cevpn agents there and makes their configuration;
- :mod:`lab.processes` starts, waits for and stops other processes (the VPN server).

Imported by the lab tests (tests/lab), the benchmarks (bench) and the demo
(tools); never by the product itself.
"""
