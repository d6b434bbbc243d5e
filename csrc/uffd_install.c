/*
 * Bulk install for prefetch; the contract is in uffd_install.h.
 *
 * Why steps: a fault read while a copy runs waits for the pump's lock, so
 * one copy of a whole run would hold a fault behind megabytes (measured, a
 * 1 GiB restore from a file: a fault read 186 us after it was raised with
 * 4 MiB copies, 7 us with 128 KiB). Why in C: from Python each step cost a
 * call with the GIL (8,192 per GiB); here the loop runs without it (cffi
 * releases the GIL around the call), so the fault path's Python runs
 * meanwhile.
 */
#define _GNU_SOURCE
#include <errno.h>

#include "uffd_install.h"
#include "uffd_pump.h"

int pyuffd_install_run(struct pyuffd_pump *p, int fd, uint64_t dst, const char *src,
		       uint64_t len, uint64_t step, uint64_t page_size, uint64_t mode,
		       uint64_t events_seen, int64_t *installed, uint64_t *reached)
{
	*installed = 0;
	*reached = 0;
	if (!page_size || (page_size & (page_size - 1)) || !step || step % page_size ||
	    len % page_size || dst % page_size)
		return -EINVAL;
	uint64_t pos = 0;
	int rc = 0;
	while (pos < len) {
		uint64_t n = len - pos < step ? len - pos : step;
		int64_t done = 0;
		rc = pyuffd_pump_install(p, fd, dst + pos, src + pos, n, mode, events_seen, &done);
		*installed += done;
		pos += (uint64_t)done;
		if (rc == -EEXIST) {
			pos += page_size; /* a fault or an earlier copy placed it: keep it */
			rc = 0;
		} else if (rc == -EAGAIN && done > 0) {
			/* A copy cut short at a present page: the next step reports it (EEXIST). */
			rc = 0;
		} else if (rc < 0) {
			break;
		}
	}
	*reached = pos;
	return rc;
}
