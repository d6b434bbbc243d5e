/*
 * The fault pump: the C side of the FaultHandler (see uffd/_handler.py).
 *
 * The Python dispatch thread blocks in pyuffd_pump_wait() with the GIL
 * released: it waits (epoll) on every userfaultfd and a stop eventfd, reads
 * events in batches, gives each page fault a slot with a deadline, serves
 * faults on native mappings itself (pyuffd_pump_map with a source) and hands
 * everything else back to Python. A watchdog thread that never takes the GIL
 * resolves any slot whose deadline passed by the mapping's fallback, and when
 * the dispatch thread has not come back to wait for half a deadline (it is
 * stuck, e.g. on the GIL held by a faulting thread) it reads the fds itself,
 * so no faulting thread is left waiting on Python.
 */
#ifndef PYUFFD_PUMP_H
#define PYUFFD_PUMP_H

#include <stdint.h>

#include "uffd_uapi.h"

/* An item handed to Python: one uffd_msg plus where it came from. */
struct pyuffd_item {
	int32_t fd;          /* the userfaultfd it was read from */
	uint32_t slot;       /* page faults: the slot to resolve; notices: what was done */
	uint64_t t_ns;       /* CLOCK_MONOTONIC when read */
	struct uffd_msg msg; /* as read; event PYUFFD_EVENT_* for the pump's own notices */
};

/* Pump notices (never used by the kernel, whose events start at 0x12). */
#define PYUFFD_EVENT_EXPIRED 0xF0  /* a fault passed its deadline and was resolved */
#define PYUFFD_EVENT_FD_ERROR 0xF1 /* reading an fd failed: arg.pagefault.flags = errno */

/* Fallback for a mapping's MISSING/MINOR faults. */
#define PYUFFD_FALLBACK_POISON 1
#define PYUFFD_FALLBACK_ZEROPAGE 2
#define PYUFFD_FALLBACK_ZEROCOPY 3 /* hugetlb: no ZEROPAGE, copy a zero page */

/* What a fallback did (the slot field of an EXPIRED notice, or a return value). */
#define PYUFFD_DID_POISON 1
#define PYUFFD_DID_ZEROPAGE 2
#define PYUFFD_DID_ZEROCOPY 3
#define PYUFFD_DID_UNPROTECT 4
#define PYUFFD_DID_CONTINUE 5
#define PYUFFD_DID_WAKE 6
#define PYUFFD_DID_UNGUARDED 0x100 /* a thread of this process, outside a guarded Region access */

/* Native sources: the pump serves MISSING faults of these mappings without Python. */
#define PYUFFD_SOURCE_NONE 0
#define PYUFFD_SOURCE_MEMORY 1 /* copy from src_addr + offset (a file's mapping too) */
#define PYUFFD_SOURCE_FILE 2   /* pread(src_fd, ..., src_offset + offset) */
#define PYUFFD_SOURCE_ZERO 3
#define PYUFFD_SOURCE_REMOTE 4 /* READ over a page server's fault-only link (uffd_link.c) */

/* Resolution operations for pyuffd_pump_resolve. */
#define PYUFFD_OP_COPY 1
#define PYUFFD_OP_ZEROPAGE 2
#define PYUFFD_OP_CONTINUE 3
#define PYUFFD_OP_POISON 4
#define PYUFFD_OP_UNPROTECT 5
#define PYUFFD_OP_WAKE 6

struct pyuffd_pump;
struct pyuffd_link;

struct pyuffd_pump *pyuffd_pump_new(uint64_t deadline_ns);
void pyuffd_pump_free(struct pyuffd_pump *pump);
int pyuffd_pump_add_fd(struct pyuffd_pump *pump, int fd, int paused);
int pyuffd_pump_serve_fd(struct pyuffd_pump *pump, int fd);
int pyuffd_pump_remove_fd(struct pyuffd_pump *pump, int fd);
int pyuffd_pump_map(struct pyuffd_pump *pump, int fd, uint64_t start, uint64_t end,
		    uint64_t page_size, int fallback, int source, uint64_t src_addr, int src_fd,
		    uint64_t src_offset, uint64_t max_run, struct pyuffd_link *link, uint32_t region,
		    uint64_t timeout_ns);
int pyuffd_pump_unmap(struct pyuffd_pump *pump, int fd, uint64_t start, uint64_t end);
int pyuffd_pump_wait(struct pyuffd_pump *pump, struct pyuffd_item *items, int max_items,
		     int timeout_ms);
int pyuffd_pump_resolve(struct pyuffd_pump *pump, int fd, uint32_t slot, int op, uint64_t dst,
			const char *src, uint64_t len, uint64_t mode, int64_t *done);
int pyuffd_pump_install(struct pyuffd_pump *pump, int fd, uint64_t dst, const char *src,
			uint64_t len, uint64_t mode, uint64_t events_seen, int64_t *done);
int pyuffd_pump_fallback(struct pyuffd_pump *pump, uint32_t slot);
int pyuffd_pump_drain(struct pyuffd_pump *pump);
int pyuffd_pump_stop(struct pyuffd_pump *pump);
void pyuffd_pump_set_spin(struct pyuffd_pump *pump, uint64_t spin_ns);
uint64_t pyuffd_pump_native_faults(struct pyuffd_pump *pump);
uint64_t pyuffd_pump_events_read(struct pyuffd_pump *pump);
/* CLOCK_MONOTONIC in nanoseconds: the one clock of the pump and its links. */
uint64_t pyuffd_now_ns(void);

/*
 * A page server's fault-only connection (uffd_link.c), already handshaken:
 * the link owns fd from pyuffd_link_new on (not on failure: NULL, errno).
 * Reference counted; the pump takes a reference per link its maps use.
 * Python learns of served faults and of the link's death through
 * notify_fd (readable), take (served faults: address, then nanoseconds
 * from the pump's read to the wake, per pair) and dead (0, or the errno).
 * fd -1 makes a link without a socket: the ring and kill switch of a
 * MEMORY map's served faults (pyuffd_pump_map takes a link for any source).
 */
struct pyuffd_link *pyuffd_link_new(int fd, int version, uint32_t max_frame);
void pyuffd_link_get(struct pyuffd_link *link);
void pyuffd_link_put(struct pyuffd_link *link);
void pyuffd_link_kill(struct pyuffd_link *link);
int pyuffd_link_dead(struct pyuffd_link *link);
int pyuffd_link_notify_fd(struct pyuffd_link *link);
int pyuffd_link_take(struct pyuffd_link *link, uint64_t *out, int max, uint64_t *lost);
int pyuffd_link_read(struct pyuffd_link *link, uint32_t region, uint64_t offset, void *buf,
		     uint64_t len, uint64_t timeout_ns, int stopfd);
void pyuffd_link_note(struct pyuffd_link *link, uint64_t addr, uint64_t latency_ns);

/* uffd_mem.c: is this thread inside a SIGBUS-safe Region access? */
int pyuffd_tid_guarded(int32_t tid);

#endif /* PYUFFD_PUMP_H */
