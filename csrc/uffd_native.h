/*
 * Thin C layer of pyuffd: the calls that must be made from C (the
 * userfaultfd syscall, ioctls with kernel structs, reading events into a
 * caller's buffer, GIL-free and SIGBUS-safe memory access, the fault pump).
 * Every function returns 0 (or a count) on success and -errno on failure;
 * policy and error messages live in Python (uffd/_errors.py).
 */
#ifndef PYUFFD_NATIVE_H
#define PYUFFD_NATIVE_H

#include <stddef.h>
#include <stdint.h>

#include "uffd_uapi.h"

/* Opening and the API handshake (uffd_fd.c). */
int pyuffd_open_syscall(int flags);
int pyuffd_open_device(int flags);
int pyuffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out);

/* Range ioctls (uffd_fd.c); *done receives the bytes handled, also on EAGAIN. */
int pyuffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out);
int pyuffd_unregister(int fd, uint64_t start, uint64_t len);
int pyuffd_wake(int fd, uint64_t start, uint64_t len);
int pyuffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *done);
int pyuffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done);
int pyuffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done);
int pyuffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done);
int pyuffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *done);
int pyuffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode);

/*
 * The calling thread's time slice under the fair scheduler (EEVDF), kept across
 * the threads it creates: sched_setattr(2) with sched_runtime = slice_ns (0: the
 * default); its policy and niceness are kept. A thread with a shorter slice than
 * the running one preempts it on wake-up.
 */
int pyuffd_set_slice(uint64_t slice_ns);

/* Events: waits up to timeout_ms (-1: forever) and reads whole uffd_msg records. */
int pyuffd_read_msgs(int fd, struct uffd_msg *buf, int max_msgs, int timeout_ms);

/* PAGEMAP_SCAN on an open /proc/PID/pagemap; returns the regions filled. */
int pyuffd_pagemap_scan(int pagemap_fd, struct pm_scan_arg *arg);

/*
 * Dirty harvest (uffd_dirty.c): PAGEMAP_SCAN with WP_MATCHING over [pos, end),
 * each written region stored as (start, length), merged when adjacent, as
 * pair number `ranges` and on: in pairs[] (cap pairs) first, then in spill[]
 * (spill_cap pairs); advances pos, ranges and bytes.  Returns 1 once pos
 * reaches end, 0 when both are full first (move the spill and call again),
 * PYUFFD_HARVEST_STALLED if the kernel made no progress, -errno on failure.
 */
struct pyuffd_harvest {
	uint64_t pos, end, ranges, bytes;
	uint64_t *spill;
	uint64_t spill_cap;
};
#define PYUFFD_HARVEST_STALLED 2
int pyuffd_dirty_harvest(int pagemap_fd, struct pyuffd_harvest *h, uint64_t *pairs, size_t cap);

/*
 * A file's page cache (uffd_memtype.c): the pages cached or swapped out in
 * [off, off + len) (cachestat, Linux 6.5), and punching [off, off + len) out
 * (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE).
 */
int64_t pyuffd_cached_pages(int fd, uint64_t off, uint64_t len);
int pyuffd_punch_hole(int fd, uint64_t off, uint64_t len);

/* GIL-free, SIGBUS-safe memory access (uffd_mem.c); *fault_addr on -EFAULT. */
int pyuffd_mem_read(void *dst, uint64_t src, size_t n, uint64_t *fault_addr);
int pyuffd_mem_write(uint64_t dst, const void *src, size_t n, uint64_t *fault_addr);
int pyuffd_mem_touch(uint64_t addr, size_t n, size_t page_size, int write, uint64_t *fault_addr);

#endif /* PYUFFD_NATIVE_H */
