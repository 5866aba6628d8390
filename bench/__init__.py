"""cevpn benchmarks: reference servers, a thin NETCONF client and the workload."""
