"""lab/xstate_shim.c: User-Mode Linux's FPU state calls work on a host whose XSAVE area
is larger than UML's buffer for it (a CPU with AMX: 11,008 bytes against UML's 2,696).

Without the shim the host refuses UML's PTRACE_SETREGSET of its 2,696 bytes with EFAULT
and every lab guest panics at its first process.  The check runs in a child Python that
traces a process of its own through the shim's ptrace(), as linux.uml does.
"""

from __future__ import annotations

import subprocess
import sys

from lab.uml import xstate_shim

UML_XSTATE = 2696
"""The bytes of XSAVE area User-Mode Linux 6.1 saves and restores (x87 to AVX-512)."""

TRACER = r"""
import ctypes, os, signal, sys

PTRACE_TRACEME, PTRACE_GETREGSET, PTRACE_SETREGSET, NT_X86_XSTATE = 0, 0x4204, 0x4205, 0x202
XMM0 = 160  # offset of xmm0 in the legacy area

class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

libc = ctypes.CDLL(None, use_errno=True)
shim = ctypes.CDLL(sys.argv[1], use_errno=True)
uml = int(sys.argv[2])
for f in (libc.ptrace, shim.ptrace):
    f.restype = ctypes.c_long
    f.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]

child = os.fork()
if child == 0:
    libc.ptrace(PTRACE_TRACEME, 0, None, None)
    os.kill(os.getpid(), signal.SIGSTOP)
    os._exit(0)
os.waitpid(child, os.WUNTRACED)

def regset(fn, request, size, buf=None):
    buf = buf or ctypes.create_string_buffer(size)
    iov = Iovec(ctypes.addressof(buf), size)
    r = fn(request, child, NT_X86_XSTATE, ctypes.byref(iov))
    return r, ctypes.get_errno(), buf, iov.len

r, err, _, host = regset(libc.ptrace, PTRACE_GETREGSET, 65536)
assert r == 0, err
r, err, buf, got = regset(shim.ptrace, PTRACE_GETREGSET, uml)
assert r == 0 and got == min(uml, host), (r, err, got)
buf[XMM0 : XMM0 + 16] = bytes(range(1, 17))
r, err, _, _ = regset(shim.ptrace, PTRACE_SETREGSET, uml, buf)
assert r == 0, f"SETREGSET of UML's {uml} bytes through the shim: errno {err}"
r, err, back, _ = regset(libc.ptrace, PTRACE_GETREGSET, 65536)
assert r == 0 and back[XMM0 : XMM0 + 16] == bytes(range(1, 17)), "xmm0 not written"
direct = regset(libc.ptrace, PTRACE_SETREGSET, uml, buf)[0] if host > uml else 0
os.kill(child, signal.SIGKILL)
print(host, direct)
"""


def test_umls_fpu_state_is_written_through_the_shim_whatever_the_hosts_xsave_size() -> None:
    done = subprocess.run(
        [sys.executable, "-c", TRACER, str(xstate_shim()), str(UML_XSTATE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    host, direct = (int(x) for x in done.stdout.split())
    if host > UML_XSTATE:  # the host this shim is for: without it the write is refused
        assert direct == -1
