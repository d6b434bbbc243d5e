/*
 * Dirty harvest for uffd.dirty.DirtyTracker: the PAGEMAP_SCAN loop of
 * Documentation/admin-guide/mm/pagemap.rst, with each reported region stored
 * as a (start, length) pair straight into flat uint64 storage: the caller's
 * array('Q') (ffi.from_buffer), then the tracker's spill buffer when that is
 * full, so that no Python object is built per range.  cffi releases the GIL
 * for the whole loop.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sys/ioctl.h>

#include "uffd_native.h"

/*
 * Regions per ioctl.  The kernel copies out at most 512 (one PMD's worth) at
 * a time whatever this is; a larger vec only saves calls.  24 KiB of stack
 * stays in L1 while its regions are copied out.
 */
#define SCAN_VEC_LEN 1024

/* Pair number i: the caller's array holds the first cap, the spill the rest. */
static uint64_t *pair(const struct pyuffd_harvest *h, uint64_t *pairs, uint64_t cap, uint64_t i)
{
	return i < cap ? &pairs[2 * i] : &h->spill[2 * (i - cap)];
}

int pyuffd_dirty_harvest(int pagemap_fd, struct pyuffd_harvest *h, uint64_t *pairs, size_t cap)
{
	struct page_region vec[SCAN_VEC_LEN];
	struct pm_scan_arg arg = {
		.size = sizeof(arg),
		.flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
		.end = h->end,
		.vec = (uintptr_t)vec,
		.category_mask = PAGE_IS_WRITTEN,
		.return_mask = PAGE_IS_WRITTEN,
	};
	/* Locals, written back at the end: stores through pairs could alias *h. */
	uint64_t room = cap + h->spill_cap, end = h->end;
	uint64_t n = h->ranges, bytes = h->bytes, pos = h->pos;
	uint64_t *last = n ? pair(h, pairs, cap, n - 1) : NULL;
	int rc = 1;

	while (pos < end) {
		/*
		 * WP_MATCHING protects every page it reports, so a region the
		 * kernel reports must be stored: never ask for more than fit.
		 */
		if (n >= room) {
			rc = 0;
			break;
		}
		arg.start = pos;
		arg.vec_len = room - n < SCAN_VEC_LEN ? room - n : SCAN_VEC_LEN;
		int got = ioctl(pagemap_fd, PAGEMAP_SCAN, &arg);
		if (got < 0) {
			rc = -errno;
			break;
		}
		for (int i = 0; i < got; i++) {
			uint64_t start = vec[i].start, len = vec[i].end - vec[i].start;
			bytes += len;
			/*
			 * A call that fills the vec stops before a page that does
			 * not extend its last region, so ranges do not touch across
			 * calls; merging anyway keeps the result merged should a
			 * kernel ever stop mid-range.
			 */
			if (last && last[0] + last[1] == start) {
				last[1] += len;
			} else {
				last = pair(h, pairs, cap, n++);
				last[0] = start;
				last[1] = len;
			}
		}
		if (arg.walk_end <= pos) {
			rc = PYUFFD_HARVEST_STALLED;
			break;
		}
		pos = arg.walk_end;
	}
	h->ranges = n;
	h->bytes = bytes;
	h->pos = pos;
	return rc;
}
