"""The kernel lab: run a script as PID 1 of a User-Mode Linux guest.

The host kernel has no ESP, IPIP or VTI (../shared/LAB.md); a UML guest
(Debian's user-mode-linux, kernel 6.1) has them all as modules.  The guest's
root file system is the host's own (hostfs), so the checkout, the venv and
/tmp are visible inside at the same paths: a test writes a script, boots a
guest that runs it, and reads what the script left in its work directory.

Each guest gets a unique umid, a private tmpfs on /run (so `ip netns` and
daemons never touch the host's /run), and is killed with its process group
if it outlives its timeout.
"""

from __future__ import annotations

import compileall
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UML_MODULES = Path("/usr/lib/uml/modules")
MODULES = (
    "esp4", "xfrm_user", "gcm", "veth", "ipip", "ip_vti", "tunnel4", "xfrm4_tunnel",
    # the ingress policy and the Internet gateway (nc_agent/dataplane/ingress.py)
    "nf_tables", "nft_ct", "nft_xfrm", "nft_limit", "nft_log", "nf_log_syslog", "nf_nat",
    # its iptables fallback (this kernel's nf_tables has no family): one modprobe at boot
    # instead of one autoloading modprobe per module in every CE's first commit
    "ip_tables", "iptable_filter", "iptable_mangle", "iptable_nat", "xt_policy",
    "xt_conntrack", "xt_tcpudp", "xt_limit", "xt_LOG", "xt_mark", "xt_connmark", "xt_nat",
    # pe as a NAT in front of a call-home CE (tests/lab/server_scenarios.py)
    "xt_MASQUERADE",
)  # fmt: skip
PACKAGES = ("user-mode-linux", "kmod", "iproute2", "tcpdump", "iputils-ping", "nftables")


class LabUnavailable(RuntimeError):
    """The lab cannot run here (not root, or User-Mode Linux missing)."""


def prepare_host() -> None:
    """Install what the lab needs and make the UML modules loadable (LAB.md set-up)."""
    if os.geteuid() != 0:
        raise LabUnavailable("the lab needs root (network namespaces, UML modules)")
    if shutil.which("linux.uml") is None:
        subprocess.run([str(ROOT / "tools" / "install-debian-packages")], check=True)
    if shutil.which("linux.uml") is None:
        raise LabUnavailable("linux.uml not found after installing user-mode-linux")
    versions = sorted(p.name for p in UML_MODULES.iterdir()) if UML_MODULES.is_dir() else []
    if not versions:
        raise LabUnavailable(f"no UML kernel modules under {UML_MODULES}")
    modules = Path("/lib/modules")
    modules.mkdir(parents=True, exist_ok=True)
    link = modules / versions[-1]
    if not link.exists():
        link.symlink_to(UML_MODULES / versions[-1])
    compile_checkout()
    xstate_shim()


SHIM_SOURCE = ROOT / "lab" / "xstate_shim.c"
SHIM = ROOT / "build" / "lab" / "xstate_shim.so"


def xstate_shim() -> Path:
    """The LD_PRELOAD library every guest runs with (lab/xstate_shim.c: UML 6.1 panics on
    a host whose XSAVE area outgrows its buffer, a CPU with AMX), built when missing or
    older than its source.  On other hosts it passes every request through unchanged."""
    if not SHIM.exists() or SHIM.stat().st_mtime < SHIM_SOURCE.stat().st_mtime:
        SHIM.parent.mkdir(parents=True, exist_ok=True)
        built = SHIM.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(
            ["cc", "-O2", "-Wall", "-shared", "-fPIC", "-o", str(built), str(SHIM_SOURCE), "-ldl"],
            check=True,
        )
        os.replace(built, SHIM)
    return SHIM


def compile_checkout() -> None:
    """Write the checkout's bytecode before a guest imports it.

    These machines set PYTHONDONTWRITEBYTECODE, so without this every process
    in the guest (four agents, the server, each CLI call) compiles the
    project's modules again from source through hostfs: over a second of a
    single slow CPU per process start.  compileall skips what is up to date.
    """
    for package in (
        "nc_core",
        "nc_agent",
        "nc_server",
        "bindings",
        "lab",
        "tests",
        "tools",
        "docs",
    ):
        compileall.compile_dir(ROOT / package, quiet=2, workers=0)


@dataclass
class GuestResult:
    returncode: int
    console: str
    workdir: Path

    def read(self, name: str) -> str:
        return (self.workdir / name).read_text()


INIT_TEMPLATE = """\
#!/bin/bash
# PID 1 of a cevpn lab guest.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs tmpfs /run
mkdir -p /run/netns
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME={workdir} PYTHONDONTWRITEBYTECODE=1 CEVPN_LAB=1
modprobe -a {modules} 2>{workdir}/modprobe.err
# The first ESP SA after boot is slow (crypto modules load, RNG seeds): warm up.
ip xfrm state add src 127.0.0.1 dst 127.0.0.2 proto esp spi 0x1 mode transport \\
  aead 'rfc4106(gcm(aes))' 0x0000000000000000000000000000000000000000 128 2>/dev/null
ip xfrm state flush
cd {root}
bash {workdir}/script.sh > {workdir}/script.log 2>&1
echo $? > {workdir}/rc
sync
halt -f
"""


def run_guest(
    script: str,
    *,
    timeout: float = 300.0,
    mem: str = "1536M",
    workdir: Path | None = None,
    on_line: Callable[[str], None] | None = None,
) -> GuestResult:
    """Boot a guest that runs ``script`` (bash) and return its exit status and output.

    The script runs as root in the guest with the checkout as current
    directory; ``$WORK`` is a directory shared with the host.  With ``on_line``,
    every console line is handed to it as it arrives (the demo's live output).
    """
    prepare_host()
    work = workdir or Path(tempfile.mkdtemp(prefix="cevpn-lab-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "script.sh").write_text(f"WORK={work}\nexport WORK\nset -u\n" + textwrap.dedent(script))
    init = work / "init.sh"
    init.write_text(INIT_TEMPLATE.format(workdir=work, root=ROOT, modules=" ".join(MODULES)))
    init.chmod(0o755)
    umid = f"cevpn-{uuid.uuid4().hex[:12]}"
    cmd = [
        "linux.uml",
        f"umid={umid}",
        f"mem={mem}",
        "root=/dev/root",
        "rootfstype=hostfs",
        "rootflags=/",
        "rw",
        "quiet",
        f"init={init}",
        "con=null",
        "con0=null,fd:1",
    ]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "LD_PRELOAD": str(xstate_shim())},
    )
    if on_line is not None:
        out = _stream(proc, on_line, timeout, umid)
        proc.wait()
        return _result(out, work)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        console = out.decode(errors="replace").replace("\r\n", "\n")
        raise TimeoutError(
            f"lab guest {umid} ran over {timeout} s; console:\n{console[-3000:]}"
        ) from None
    finally:
        shutil.rmtree(Path.home() / ".uml" / umid, ignore_errors=True)
    return _result(out, work)


def _stream(
    proc: subprocess.Popen[bytes], on_line: Callable[[str], None], timeout: float, umid: str
) -> bytes:
    """Hand each console line to ``on_line`` while the guest runs; kill it at the timeout."""
    assert proc.stdout is not None
    killer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    killer.start()
    chunks: list[bytes] = []
    try:
        for raw in proc.stdout:
            chunks.append(raw)
            on_line(raw.decode(errors="replace").rstrip("\r\n"))
    finally:
        killer.cancel()
        shutil.rmtree(Path.home() / ".uml" / umid, ignore_errors=True)
    return b"".join(chunks)


def _result(out: bytes, work: Path) -> GuestResult:
    console = out.decode(errors="replace").replace("\r\n", "\n")
    rc_file = work / "rc"
    rc = int(rc_file.read_text().strip()) if rc_file.exists() else 255
    log = work / "script.log"
    return GuestResult(rc, console + (log.read_text() if log.exists() else ""), work)
