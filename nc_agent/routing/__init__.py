"""VPN-space dynamic routing (seed 4.3): OSPFv2 through the tunnels, run by BIRD 2."""
