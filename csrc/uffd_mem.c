/*
 * Memory access for Region.read/write/touch: runs without the GIL (cffi
 * releases it), so a Python handler thread can serve the faults these
 * accesses raise, and turns SIGBUS (a poisoned page, UFFD_FEATURE_SIGBUS)
 * into -EFAULT with the faulting address instead of killing the process.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <string.h>

#include <sys/syscall.h>
#include <unistd.h>

#include "uffd_native.h"
#include "uffd_pump.h"

static __thread sigjmp_buf guard_jmp;
static __thread volatile sig_atomic_t guard_active;
static __thread volatile uint64_t guard_addr;
static struct sigaction previous_sigbus;
static pthread_once_t install_once = PTHREAD_ONCE_INIT;

/*
 * Threads inside a guarded access, by tid: the pump's watchdog asks before it
 * poisons a page, because a SIGBUS outside a guarded access kills the process.
 */
#define GUARD_SLOTS 256
static int32_t guarded_tids[GUARD_SLOTS];
static __thread int guard_slot = -1;

static void guard_enter(void)
{
	int32_t tid = (int32_t)syscall(SYS_gettid);
	for (int i = 0; i < GUARD_SLOTS; i++) {
		int32_t expected = 0;
		if (__atomic_compare_exchange_n(&guarded_tids[i], &expected, tid, 0, __ATOMIC_SEQ_CST,
						__ATOMIC_SEQ_CST)) {
			guard_slot = i;
			return;
		}
	}
}

static void guard_leave(void)
{
	if (guard_slot >= 0)
		__atomic_store_n(&guarded_tids[guard_slot], 0, __ATOMIC_SEQ_CST);
	guard_slot = -1;
}

int pyuffd_tid_guarded(int32_t tid)
{
	for (int i = 0; i < GUARD_SLOTS; i++)
		if (__atomic_load_n(&guarded_tids[i], __ATOMIC_SEQ_CST) == tid)
			return 1;
	return 0;
}

static void on_sigbus(int sig, siginfo_t *info, void *ctx)
{
	if (guard_active) {
		guard_active = 0;
		guard_addr = (uint64_t)(uintptr_t)info->si_addr;
		siglongjmp(guard_jmp, 1);
	}
	/* Not ours: hand the signal to whoever had it (faulthandler, default). */
	if (previous_sigbus.sa_flags & SA_SIGINFO) {
		previous_sigbus.sa_sigaction(sig, info, ctx);
	} else if (previous_sigbus.sa_handler != SIG_IGN && previous_sigbus.sa_handler != SIG_DFL) {
		previous_sigbus.sa_handler(sig);
	} else {
		/* Returning re-executes the access, which now takes the default action. */
		signal(SIGBUS, SIG_DFL);
	}
}

static void install_handler(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_sigbus;
	sa.sa_flags = SA_SIGINFO | SA_NODEFER;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGBUS, &sa, &previous_sigbus);
}

/* Runs body with SIGBUS turned into a return of -EFAULT. */
#define GUARDED(fault_addr, body)                                \
	do {                                                     \
		pthread_once(&install_once, install_handler);    \
		guard_enter();                                   \
		if (sigsetjmp(guard_jmp, 1)) {                   \
			guard_leave();                           \
			*(fault_addr) = guard_addr;              \
			return -EFAULT;                          \
		}                                                \
		guard_active = 1;                                \
		body;                                            \
		guard_active = 0;                                \
		guard_leave();                                   \
		return 0;                                        \
	} while (0)

int pyuffd_mem_read(void *dst, uint64_t src, size_t n, uint64_t *fault_addr)
{
	GUARDED(fault_addr, memcpy(dst, (const void *)(uintptr_t)src, n));
}

int pyuffd_mem_write(uint64_t dst, const void *src, size_t n, uint64_t *fault_addr)
{
	GUARDED(fault_addr, memcpy((void *)(uintptr_t)dst, src, n));
}

static void touch_pages(uint64_t addr, size_t n, size_t page_size, int write)
{
	for (uint64_t p = addr; p < addr + n; p += page_size) {
		volatile uint8_t *byte = (volatile uint8_t *)(uintptr_t)p;
		if (write)
			/* A write access that leaves the byte unchanged, even if another thread writes it. */
			__atomic_fetch_add(byte, 0, __ATOMIC_RELAXED);
		else
			(void)*byte;
	}
}

int pyuffd_mem_touch(uint64_t addr, size_t n, size_t page_size, int write, uint64_t *fault_addr)
{
	GUARDED(fault_addr, touch_pages(addr, n, page_size, write));
}
