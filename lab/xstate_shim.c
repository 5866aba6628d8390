/*
 * LD_PRELOAD shim for linux.uml: User-Mode Linux 6.1 on a host whose XSAVE area is
 * larger than UML's buffer for it.
 *
 * UML saves and restores its processes' FPU state with PTRACE_GETREGSET /
 * PTRACE_SETREGSET (NT_X86_XSTATE) on a buffer of 2,696 bytes: x87, SSE, AVX and
 * AVX-512.  On a CPU with AMX the host's area is 11,008 bytes, and the host kernel
 * refuses a SETREGSET of anything but the whole area with EFAULT
 * (xstateregs_set: "A whole standard-format XSAVE buffer is needed"), so the guest
 * panics at its first process: "userspace - ptrace set fp regs failed, errno = 14".
 *
 * Here a GETREGSET reads the whole area and hands UML the part it holds; a
 * SETREGSET of UML's part is written as a whole area whose further components
 * (AMX's, which no guest process can enable: UML implements no
 * ARCH_REQ_XCOMP_PERM) are in their initial state.  Any other ptrace request, and
 * an XSTATE request UML makes with the whole area, goes to the C library as is.
 * UML's kernel runs on one host thread, so one static buffer is enough; it must not
 * be on the stack (UML's kernel stacks are small) nor from malloc (UML wraps it).
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <dlfcn.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>

#define NT_X86_XSTATE 0x202
#define XSTATE_BV_OFFSET 512 /* the XSAVE header's feature bitmap */

typedef long (*ptrace_fn)(int, pid_t, void *, void *);
static ptrace_fn real_ptrace;
static unsigned char whole[65536] __attribute__((aligned(64)));
static size_t host_size; /* the host's area, learnt from the first GETREGSET */

/* The user state components (bits of XSTATE_BV) that end within the first len bytes of
   a standard-format XSAVE area. */
static uint64_t components_within(size_t len)
{
    uint64_t mask = 3; /* x87 and SSE: the legacy area */
    for (unsigned i = 2; i < 64; i++) {
        unsigned eax, ebx, ecx, edx;
        __cpuid_count(0xd, i, eax, ebx, ecx, edx);
        if (eax == 0 || (ecx & 1))
            continue; /* not supported, or a supervisor component */
        if ((size_t)ebx + eax <= len)
            mask |= 1ULL << i;
    }
    return mask;
}

long ptrace(enum __ptrace_request request, ...)
{
    va_list ap;
    va_start(ap, request);
    pid_t pid = va_arg(ap, pid_t);
    void *addr = va_arg(ap, void *);
    void *data = va_arg(ap, void *);
    va_end(ap);
    if (!real_ptrace)
        real_ptrace = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
    if ((uintptr_t)addr != NT_X86_XSTATE
        || (request != PTRACE_GETREGSET && request != PTRACE_SETREGSET))
        return real_ptrace(request, pid, addr, data);
    struct iovec *iov = data;
    struct iovec all = {whole, sizeof whole};
    if (request == PTRACE_GETREGSET) {
        long r = real_ptrace(request, pid, addr, &all);
        if (r < 0)
            return r;
        host_size = all.iov_len;
        size_t n = iov->iov_len < host_size ? iov->iov_len : host_size;
        memcpy(iov->iov_base, whole, n);
        iov->iov_len = n;
        return r;
    }
    if (host_size == 0 || iov->iov_len >= host_size || host_size > sizeof whole)
        return real_ptrace(request, pid, addr, data);
    size_t n = iov->iov_len;
    memset(whole, 0, host_size);
    memcpy(whole, iov->iov_base, n);
    static size_t mask_len;
    static uint64_t mask;
    if (mask_len != n) { /* once: CPUID traps to the hypervisor in a VM, ~60 calls here */
        mask = components_within(n);
        mask_len = n;
    }
    uint64_t bv;
    memcpy(&bv, whole + XSTATE_BV_OFFSET, sizeof bv);
    bv &= mask;
    memcpy(whole + XSTATE_BV_OFFSET, &bv, sizeof bv);
    all.iov_len = host_size;
    return real_ptrace(request, pid, addr, &all);
}
