/*
 * Bulk install for prefetch (uffd_install.c): one call copies a long run
 * into the restored process, so Python pays one call per run, not one per
 * UFFDIO_COPY step.
 */
#ifndef PYUFFD_INSTALL_H
#define PYUFFD_INSTALL_H

#include <stdint.h>

#include "uffd_uapi.h"

struct pyuffd_pump;

/*
 * UFFDIO_COPY of [src, src + len) to dst in steps of `step` bytes, each one
 * pyuffd_pump_install (under the pump's lock, refused once an event newer
 * than events_seen was read). A page already present (EEXIST) is skipped.
 * *installed gets the bytes copied, *reached how far the run got (installed
 * plus skipped pages). Returns 0 once the whole run is reached; -EAGAIN
 * when the mappings are changing (an event not applied yet, or the kernel's
 * mmap_changing): *reached says where to resume after a re-check; -EINVAL
 * for a length, address or step that is not whole pages; else the copy's
 * -errno (ENOENT: the range went, ESRCH: the process exited, EBADF).
 */
int pyuffd_install_run(struct pyuffd_pump *pump, int fd, uint64_t dst, const char *src,
		       uint64_t len, uint64_t step, uint64_t page_size, uint64_t mode,
		       uint64_t events_seen, int64_t *installed, uint64_t *reached);

#endif /* PYUFFD_INSTALL_H */
