/*
 * restore_vmm: a stand-in VMM for the bench's restore-daemon workload.
 *
 * It does what Firecracker does when it restores a snapshot with a UFFD
 * memory backend: map guest memory anonymous, open a userfaultfd
 * (EVENT_REMOVE, O_NONBLOCK|O_CLOEXEC), register it MISSING, connect to the
 * handler's Unix socket and send one sendmsg: the JSON mappings with the
 * fd as SCM_RIGHTS.  Then, like a guest running while its memory streams
 * in, it touches random pages every PACE microseconds and times each access
 * here, in the faulting process, until every page is present (mincore(2),
 * polled by a second thread) or TIMEOUT seconds pass.  Last it checks every
 * byte of every page against the bench pattern (page i holds 1 + i % 251).
 *
 * Usage: restore_vmm SOCKET PAGES SEED PACE_US TIMEOUT_S
 *
 * Output, one line of JSON on stdout: handshake_at_ns (CLOCK_MONOTONIC when
 * the handshake was sent), handshake_ns (connect + sendmsg),
 * first_access_ns (handshake sent -> the first touch, made at once, done),
 * complete_ns
 * (handshake sent -> every page present; 0 if never), bad_pages, and
 * touches: [[t_ns since the handshake, access ns, missing before], ...]
 * where "missing before" is 1 when mincore said the page was not present
 * just before the access (a fault).  Exit status 1 on a setup failure.
 *
 * Build: gcc -O2 -Wall -Wextra -pthread -o restore_vmm restore_vmm.c
 * See userfaultfd(2), unix(7), mincore(2).
 */
#define _GNU_SOURCE
#include <err.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_TOUCHES 100000

struct touch {
	uint64_t at_ns, access_ns;
	int missing;
};

static char *base;
static size_t npages, page_size;
static uint64_t t_handshake;
static atomic_int complete;
static uint64_t complete_ns;
static double timeout_s;

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static uint64_t xorshift(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static int page_missing(size_t page)
{
	unsigned char v = 0;

	if (mincore(base + page * page_size, page_size, &v))
		return -1;
	return !(v & 1);
}

/*
 * Poll mincore from the first page not yet seen present, a window at a time
 * (cheap: the scan advances over each page about once), until all are.
 */
#define WINDOW 16384

static void *watch_complete(void *arg)
{
	unsigned char vec[WINDOW];
	size_t lo = 0;
	uint64_t give_up = t_handshake + (uint64_t)(timeout_s * 1e9);

	(void)arg;
	while (now_ns() < give_up) {
		for (;;) {
			size_t n = npages - lo < WINDOW ? npages - lo : WINDOW;
			size_t i = 0;

			if (!n)
				break;
			if (mincore(base + lo * page_size, n * page_size, vec))
				err(1, "mincore");
			while (i < n && (vec[i] & 1))
				i++;
			lo += i;
			if (i < n)
				break;
		}
		if (lo == npages) {
			complete_ns = now_ns() - t_handshake;
			break;
		}
		usleep(1000);
	}
	atomic_store(&complete, 1);
	return NULL;
}

static int send_handshake(const char *path, int ufd, size_t len)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	char json[256], cbuf[CMSG_SPACE(sizeof(int))];
	struct iovec iov;
	struct msghdr msg = { 0 };
	struct cmsghdr *cmsg;
	int sock, n;

	n = snprintf(json, sizeof(json),
		     "[{\"base_host_virt_addr\":%lu,\"size\":%zu,\"offset\":0,"
		     "\"page_size\":%zu,\"page_size_kib\":%zu}]",
		     (unsigned long)(uintptr_t)base, len, page_size, page_size);
	iov.iov_base = json;
	iov.iov_len = n;
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	msg.msg_control = cbuf;
	msg.msg_controllen = sizeof(cbuf);
	cmsg = CMSG_FIRSTHDR(&msg);
	cmsg->cmsg_level = SOL_SOCKET;
	cmsg->cmsg_type = SCM_RIGHTS;
	cmsg->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cmsg), &ufd, sizeof(int));
	strncpy(addr.sun_path, path, sizeof(addr.sun_path) - 1);
	sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (sock < 0)
		return -1;
	if (connect(sock, (struct sockaddr *)&addr, sizeof(addr)) ||
	    sendmsg(sock, &msg, 0) != n) {
		close(sock);
		return -1;
	}
	close(sock);
	return 0;
}

int main(int argc, char **argv)
{
	struct uffdio_api api = { .api = UFFD_API,
				  .features = UFFD_FEATURE_EVENT_REMOVE };
	struct uffdio_register reg = { .mode = UFFDIO_REGISTER_MODE_MISSING };
	struct touch *touches;
	size_t ntouch = 0, bad = 0, i, len;
	uint64_t seed, pace_ns, t0, handshake_ns, deadline;
	volatile char sink = 0;
	pthread_t watcher;
	int ufd;

	if (argc != 6)
		errx(2, "usage: restore_vmm SOCKET PAGES SEED PACE_US TIMEOUT_S");
	npages = strtoull(argv[2], NULL, 0);
	seed = strtoull(argv[3], NULL, 0) * 2654435761ULL + 1;
	pace_ns = strtoull(argv[4], NULL, 0) * 1000;
	timeout_s = strtod(argv[5], NULL);
	page_size = sysconf(_SC_PAGESIZE);
	len = npages * page_size;
	touches = calloc(MAX_TOUCHES, sizeof(*touches));
	base = mmap(NULL, len, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (!touches || base == MAP_FAILED)
		err(1, "allocating %zu pages", npages);
	madvise(base, len, MADV_NOHUGEPAGE);
	ufd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (ufd < 0 || ioctl(ufd, UFFDIO_API, &api))
		err(1, "userfaultfd");
	reg.range.start = (uintptr_t)base;
	reg.range.len = len;
	if (ioctl(ufd, UFFDIO_REGISTER, &reg))
		err(1, "UFFDIO_REGISTER");
	t0 = now_ns();
	if (send_handshake(argv[1], ufd, len))
		err(1, "handshake to %s", argv[1]);
	t_handshake = now_ns();
	handshake_ns = t_handshake - t0;
	if (pthread_create(&watcher, NULL, watch_complete, NULL))
		errx(1, "pthread_create");
	deadline = t_handshake + (uint64_t)(timeout_s * 1e9);
	while (!atomic_load(&complete) && ntouch < MAX_TOUCHES) {
		size_t page = xorshift(&seed) % npages;
		int missing = page_missing(page);
		uint64_t f0 = now_ns();

		sink += *(volatile char *)(base + page * page_size);
		touches[ntouch].access_ns = now_ns() - f0;
		touches[ntouch].at_ns = f0 - t_handshake;
		touches[ntouch].missing = missing;
		ntouch++;
		if (f0 > deadline)
			break;
		while (now_ns() < f0 + pace_ns && !atomic_load(&complete))
			usleep(pace_ns / 4000 ? pace_ns / 4000 : 1);
	}
	pthread_join(watcher, NULL);
	if (complete_ns) {
		for (i = 0; i < npages; i++) {
			const uint64_t *w = (const uint64_t *)(base + i * page_size);
			uint64_t want = 0x0101010101010101ULL * (1 + i % 251);
			size_t k;

			for (k = 0; k < page_size / 8; k++)
				if (w[k] != want)
					break;
			bad += k < page_size / 8;
		}
	}
	(void)sink;
	printf("{\"pages\":%zu,\"handshake_at_ns\":%lu,\"handshake_ns\":%lu,\"first_access_ns\":%lu,"
	       "\"complete_ns\":%lu,\"bad_pages\":%zu,\"verified\":%d,"
	       "\"touches\":[",
	       npages, (unsigned long)t_handshake, (unsigned long)handshake_ns,
	       (unsigned long)(ntouch ? touches[0].at_ns + touches[0].access_ns
				      : 0),
	       (unsigned long)complete_ns, bad, complete_ns != 0);
	for (i = 0; i < ntouch; i++)
		printf("%s[%lu,%lu,%d]", i ? "," : "",
		       (unsigned long)touches[i].at_ns,
		       (unsigned long)touches[i].access_ns,
		       touches[i].missing);
	printf("]}\n");
	return 0;
}
