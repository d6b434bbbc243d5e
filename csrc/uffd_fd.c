/* Syscall and ioctl wrappers: one kernel call each, no policy. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/sched.h>
#include <linux/sched/types.h>

#include "uffd_native.h"

#define RETURN_ERRNO(expr) return (expr) < 0 ? -errno : 0

int pyuffd_open_syscall(int flags)
{
	long fd = syscall(__NR_userfaultfd, flags);
	return fd < 0 ? -errno : (int)fd;
}

int pyuffd_open_device(int flags)
{
	int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	if (dev < 0)
		return -errno;
	int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
	int err = errno;
	close(dev);
	return fd < 0 ? -err : fd;
}

int pyuffd_api(int fd, uint64_t features, uint64_t *features_out, uint64_t *ioctls_out)
{
	struct uffdio_api api = { .api = UFFD_API, .features = features };
	if (ioctl(fd, UFFDIO_API, &api) < 0)
		return -errno;
	*features_out = api.features;
	*ioctls_out = api.ioctls;
	return 0;
}

int pyuffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls_out)
{
	struct uffdio_register reg = { .range = { start, len }, .mode = mode };
	if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
		return -errno;
	*ioctls_out = reg.ioctls;
	return 0;
}

int pyuffd_unregister(int fd, uint64_t start, uint64_t len)
{
	struct uffdio_range range = { start, len };
	RETURN_ERRNO(ioctl(fd, UFFDIO_UNREGISTER, &range));
}

int pyuffd_wake(int fd, uint64_t start, uint64_t len)
{
	struct uffdio_range range = { start, len };
	RETURN_ERRNO(ioctl(fd, UFFDIO_WAKE, &range));
}

/*
 * The fill ioctls report progress in their last field: bytes done, or a
 * negative errno when nothing was done. A partial EAGAIN leaves the count.
 */
static int fill_result(int rc, int64_t field, int64_t *done)
{
	int err = rc < 0 ? errno : 0;
	*done = field > 0 ? field : 0;
	return -err;
}

int pyuffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *done)
{
	struct uffdio_copy arg = { .dst = dst, .src = src, .len = len, .mode = mode };
	int rc = ioctl(fd, UFFDIO_COPY, &arg);
	return fill_result(rc, arg.copy, done);
}

int pyuffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done)
{
	struct uffdio_zeropage arg = { .range = { start, len }, .mode = mode };
	int rc = ioctl(fd, UFFDIO_ZEROPAGE, &arg);
	return fill_result(rc, arg.zeropage, done);
}

int pyuffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done)
{
	struct uffdio_continue arg = { .range = { start, len }, .mode = mode };
	int rc = ioctl(fd, UFFDIO_CONTINUE, &arg);
	return fill_result(rc, arg.mapped, done);
}

int pyuffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done)
{
	struct uffdio_poison arg = { .range = { start, len }, .mode = mode };
	int rc = ioctl(fd, UFFDIO_POISON, &arg);
	return fill_result(rc, arg.updated, done);
}

int pyuffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *done)
{
	struct uffdio_move arg = { .dst = dst, .src = src, .len = len, .mode = mode };
	int rc = ioctl(fd, UFFDIO_MOVE, &arg);
	return fill_result(rc, arg.move, done);
}

int pyuffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
	struct uffdio_writeprotect arg = { .range = { start, len }, .mode = mode };
	RETURN_ERRNO(ioctl(fd, UFFDIO_WRITEPROTECT, &arg));
}

int pyuffd_read_msgs(int fd, struct uffd_msg *buf, int max_msgs, int timeout_ms)
{
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	int ready = poll(&pfd, 1, timeout_ms);
	if (ready < 0)
		return -errno;
	if (ready == 0)
		return 0;
	if (pfd.revents & POLLNVAL)
		return -EBADF;
	ssize_t n = read(fd, buf, (size_t)max_msgs * sizeof(*buf));
	if (n < 0)
		return errno == EAGAIN ? 0 : -errno;
	return (int)(n / (ssize_t)sizeof(*buf));
}

int pyuffd_pagemap_scan(int pagemap_fd, struct pm_scan_arg *arg)
{
	arg->size = sizeof(*arg);
	int n = ioctl(pagemap_fd, PAGEMAP_SCAN, arg);
	return n < 0 ? -errno : n;
}

int pyuffd_set_slice(uint64_t slice_ns)
{
	struct sched_attr attr = { 0 };
	if (syscall(SYS_sched_getattr, 0, &attr, sizeof(attr), 0) < 0)
		return -errno;
	if (attr.sched_policy != SCHED_NORMAL && attr.sched_policy != SCHED_BATCH)
		return -EINVAL; /* a real-time or deadline thread keeps its own parameters */
	attr.size = sizeof(attr);
	attr.sched_flags &= SCHED_FLAG_RESET_ON_FORK;
	attr.sched_runtime = slice_ns;
	RETURN_ERRNO(syscall(SYS_sched_setattr, 0, &attr, 0));
}
