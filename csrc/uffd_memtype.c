/*
 * Page-cache calls of the memory-type layer (uffd/_memtype.py, FileMemory):
 * look pages up without mapping or reading them, and punch one out again.
 * One kernel call each, no policy; -errno on failure.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "uffd_native.h"

/*
 * cachestat(2), Linux 6.5. Debian 12's 6.1 headers have neither the syscall
 * number (451 on x86_64 and in the generic table alike) nor the structs of
 * <linux/mman.h>; those structs come with no macro to test, so they are
 * carried under our own names (the layout is uAPI and cannot change).
 */
#ifndef __NR_cachestat
#define __NR_cachestat 451
#endif

struct pyuffd_cachestat_range {
	uint64_t off;
	uint64_t len;
};

struct pyuffd_cachestat {
	uint64_t nr_cache;
	uint64_t nr_dirty;
	uint64_t nr_writeback;
	uint64_t nr_evicted;
	uint64_t nr_recently_evicted;
};

int64_t pyuffd_cached_pages(int fd, uint64_t off, uint64_t len)
{
	struct pyuffd_cachestat_range range = { .off = off, .len = len };
	struct pyuffd_cachestat cs = { 0 };
	if (syscall(__NR_cachestat, fd, &range, &cs, 0) < 0)
		return -errno;
	/*
	 * A shmem page that was swapped out counts as evicted, yet it is still
	 * the file's page: the fault path swaps it in and reports MINOR.
	 */
	return (int64_t)(cs.nr_cache + cs.nr_evicted);
}

int pyuffd_punch_hole(int fd, uint64_t off, uint64_t len)
{
	int mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
	return fallocate(fd, mode, (off_t)off, (off_t)len) < 0 ? -errno : 0;
}
