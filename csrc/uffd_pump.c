/* The fault pump and its watchdog; the model is described in uffd_pump.h. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "uffd_native.h"
#include "uffd_pump.h"

_Static_assert(sizeof(struct pyuffd_item) == 48, "pyuffd_item is 48 bytes");

#define NSLOTS 4096
#define SLOT_BITS 12
#define MAX_FDS 256
#define READ_BATCH 64
#define TAKEOVER_NS 20000000ull /* the dispatch thread away from wait this long: read for it */

enum slot_state { SLOT_FREE = 0, SLOT_PENDING, SLOT_RESOLVING };

struct slot {
	uint32_t gen;
	uint8_t state;
	int fd;
	uint64_t addr;
	uint64_t flags;
	uint32_t ptid;
	uint64_t deadline_ns;
};

struct map {
	int fd;
	uint64_t start, end, page_size;
	int fallback, source, src_fd;
	uint64_t src_addr, src_offset;
	uint64_t max_run; /* native sources: the most bytes one fault may install */
	uint64_t run;     /* the current run: doubles while faults are sequential */
	uint64_t next;    /* where the next sequential fault would be */
	struct pyuffd_link *link; /* REMOTE: region's pages over link, at src_offset + offset;
				   * other sources: where served faults are noted (dead: none served) */
	uint32_t region;
	uint64_t timeout_ns; /* REMOTE: the longest one fault waits for the server */
};

struct pyuffd_pump {
	pthread_mutex_t lock;
	pthread_cond_t tick;
	pthread_t watchdog;
	int epfd, stopfd, kickfd;
	int stopping, destroying;
	uint64_t deadline_ns;
	int fds[MAX_FDS]; /* watched: in the epoll set, read by wait, spin and the watchdog */
	int nfds;
	int paused[MAX_FDS]; /* added paused: nobody reads them until pyuffd_pump_serve_fd */
	int npaused;
	struct map *maps;
	int nmaps, maps_cap;
	struct slot slots[NSLOTS];
	uint32_t next_slot;
	struct pyuffd_item *backlog; /* FIFO ring of items read by the watchdog */
	int bl_head, bl_count, bl_cap;
	int in_wait;
	uint64_t left_wait_ns;
	uint64_t native_faults;
	uint64_t events_read; /* non-fault events read so far: installs check it */
	int fault_waiting; /* fault-path threads waiting for the lock: installs let them go first */
	uint64_t spin_ns;     /* poll this long before blocking in epoll (0: never) */
	int stop_requested;   /* set by pyuffd_pump_stop, seen while spinning */
	void *zero_page; /* for ZEROCOPY fallbacks, sized to the largest page */
	uint64_t zero_len;
	void *bounce; /* FILE sources read here before UFFDIO_COPY */
	uint64_t bounce_len;
	int *srcs; /* dups of FILE source fds, owned by the pump (see pyuffd_pump_map) */
	int nsrcs, srcs_cap;
	struct pyuffd_link **links; /* REMOTE links the maps use, one reference each */
	int nlinks, links_cap;
	int reading; /* a FILE or REMOTE source is being read with the lock released */
	uint32_t lone_reads; /* the spin's reads in a row that found one message (see spin) */
};

uint64_t pyuffd_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/*
 * The lock for the fault path (waiting for faults, resolving them): counted
 * while it waits, so an install, which takes the lock once per step, lets
 * it go first (see pyuffd_pump_install).
 */
static void lock_for_fault(struct pyuffd_pump *p)
{
	__atomic_add_fetch(&p->fault_waiting, 1, __ATOMIC_SEQ_CST);
	pthread_mutex_lock(&p->lock);
	__atomic_sub_fetch(&p->fault_waiting, 1, __ATOMIC_SEQ_CST);
}

static struct map *find_map(struct pyuffd_pump *p, int fd, uint64_t addr)
{
	for (int i = 0; i < p->nmaps; i++)
		if (p->maps[i].fd == fd && p->maps[i].start <= addr && addr < p->maps[i].end)
			return &p->maps[i];
	return NULL;
}

static int grow(void **buf, int *cap, int need, size_t elem)
{
	if (need <= *cap)
		return 0;
	int ncap = *cap ? *cap * 2 : 16;
	while (ncap < need)
		ncap *= 2;
	void *nb = realloc(*buf, (size_t)ncap * elem);
	if (!nb)
		return -ENOMEM;
	*buf = nb;
	*cap = ncap;
	return 0;
}

/*
 * Buffers the pump fills while it reads come from mmap, never malloc: the
 * watchdog may read a FORK event while fork() in this process waits for
 * exactly that read, and glibc's fork() holds every malloc arena lock then.
 */
static void *pages_alloc(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	return p == MAP_FAILED ? NULL : p;
}

static void pages_free(void *buf, size_t len)
{
	if (buf)
		munmap(buf, len);
}

static int ensure_buffer(void **buf, uint64_t *len, uint64_t need)
{
	if (*len >= need)
		return 0;
	void *nb = pages_alloc(need); /* zero-filled */
	if (!nb)
		return -ENOMEM;
	pages_free(*buf, *len);
	*buf = nb;
	*len = need;
	return 0;
}

/*
 * Make room for n more backlog items. Done before anything is read or
 * resolved for the backlog, so a push never fails: an item that could not be
 * queued would be a fault or an event read from the kernel and then lost.
 */
static int backlog_reserve(struct pyuffd_pump *p, int n)
{
	if (p->bl_count + n <= p->bl_cap)
		return 0;
	int ncap = p->bl_cap ? p->bl_cap * 2 : 1024;
	while (ncap < p->bl_count + n)
		ncap *= 2;
	/* Unroll the ring into the larger buffer. */
	struct pyuffd_item *nb = pages_alloc((size_t)ncap * sizeof(*nb));
	if (!nb)
		return -ENOMEM;
	for (int i = 0; i < p->bl_count; i++)
		nb[i] = p->backlog[(p->bl_head + i) % p->bl_cap];
	pages_free(p->backlog, (size_t)p->bl_cap * sizeof(*nb));
	p->backlog = nb;
	p->bl_cap = ncap;
	p->bl_head = 0;
	return 0;
}

/* Queue an item; the caller reserved room for it (backlog_reserve). */
static void backlog_push(struct pyuffd_pump *p, const struct pyuffd_item *item)
{
	p->backlog[(p->bl_head + p->bl_count) % p->bl_cap] = *item;
	p->bl_count++;
}

static void kick(int efd)
{
	uint64_t one = 1;
	ssize_t rc = write(efd, &one, sizeof(one));
	(void)rc;
}

static uint32_t slot_alloc(struct pyuffd_pump *p, int fd, const struct uffd_msg *msg, uint64_t deadline)
{
	for (uint32_t n = 0; n < NSLOTS; n++) {
		uint32_t i = (p->next_slot + n) % NSLOTS;
		struct slot *s = &p->slots[i];
		if (s->state != SLOT_FREE)
			continue;
		p->next_slot = i + 1;
		s->gen = (s->gen + 1) & 0xFFFFF;
		s->state = SLOT_PENDING;
		s->fd = fd;
		s->addr = msg->arg.pagefault.address;
		s->flags = msg->arg.pagefault.flags;
		s->ptid = msg->arg.pagefault.feat.ptid;
		s->deadline_ns = deadline;
		return (s->gen << SLOT_BITS) | i;
	}
	return UINT32_MAX; /* untracked: more faults in flight than slots */
}

static struct slot *slot_get(struct pyuffd_pump *p, uint32_t id)
{
	if (id == UINT32_MAX)
		return NULL;
	struct slot *s = &p->slots[id & (NSLOTS - 1)];
	return s->gen == id >> SLOT_BITS ? s : NULL;
}

static int own_thread(uint32_t ptid)
{
	char path[64];
	if (!ptid)
		return 0;
	snprintf(path, sizeof(path), "/proc/self/task/%u", ptid);
	return access(path, F_OK) == 0;
}

/*
 * Resolve a fault without Python. WP faults are un-protected and MINOR
 * faults continued (the page exists); MISSING faults get the mapping's
 * fallback. A poison marker is only used where the SIGBUS it raises can be
 * caught: a thread of this process outside a guarded Region access would
 * take the whole process down, so it gets a zero page instead.
 * Called with the lock held; returns PYUFFD_DID_* (| UNGUARDED) or -errno.
 */
static int do_fallback(struct pyuffd_pump *p, int fd, uint64_t addr, uint64_t flags, uint32_t ptid)
{
	struct map *m = find_map(p, fd, addr);
	uint64_t ps = m ? m->page_size : (uint64_t)sysconf(_SC_PAGESIZE);
	uint64_t page = addr & ~(ps - 1);
	int fallback = m ? m->fallback : PYUFFD_FALLBACK_ZEROPAGE;
	int unguarded = own_thread(ptid) && !pyuffd_tid_guarded((int32_t)ptid);
	int64_t done;
	int rc, did;

	if (fallback == PYUFFD_FALLBACK_POISON && unguarded)
		fallback = (m && m->page_size > (uint64_t)sysconf(_SC_PAGESIZE)) ? PYUFFD_FALLBACK_ZEROCOPY
										 : PYUFFD_FALLBACK_ZEROPAGE;
	if (flags & UFFD_PAGEFAULT_FLAG_WP) {
		did = PYUFFD_DID_UNPROTECT;
		rc = pyuffd_writeprotect(fd, page, ps, 0);
	} else if ((flags & UFFD_PAGEFAULT_FLAG_MINOR) && fallback != PYUFFD_FALLBACK_POISON) {
		did = PYUFFD_DID_CONTINUE;
		rc = pyuffd_continue(fd, page, ps, 0, &done);
	} else if (fallback == PYUFFD_FALLBACK_POISON) {
		did = PYUFFD_DID_POISON;
		rc = pyuffd_poison(fd, page, ps, 0, &done);
	} else if (fallback == PYUFFD_FALLBACK_ZEROCOPY) {
		did = PYUFFD_DID_ZEROCOPY;
		rc = ensure_buffer(&p->zero_page, &p->zero_len, ps);
		if (rc == 0)
			rc = pyuffd_copy(fd, page, (uint64_t)(uintptr_t)p->zero_page, ps, 0, &done);
	} else {
		did = PYUFFD_DID_ZEROPAGE;
		rc = pyuffd_zeropage(fd, page, ps, 0, &done);
	}
	if (rc == -EEXIST || rc == -ENOENT || rc == -EAGAIN) {
		/* Present already, or the range went away: the thread only needs waking. */
		rc = pyuffd_wake(fd, page, ps);
		did = PYUFFD_DID_WAKE;
	}
	return rc < 0 ? rc : did | (unguarded ? PYUFFD_DID_UNGUARDED : 0);
}

/*
 * Close the FILE source dups and drop the REMOTE links no map uses any more
 * (lock held). Deferred while a source is read with the lock released: that
 * read may be on one of them, and a number closed under it could be reused
 * by another file meanwhile (a link freed under its reader).
 */
static void sweep_srcs(struct pyuffd_pump *p)
{
	if (p->reading)
		return;
	for (int i = p->nsrcs - 1; i >= 0; i--) {
		int used = 0;
		for (int j = 0; j < p->nmaps && !used; j++)
			used = p->maps[j].source == PYUFFD_SOURCE_FILE && p->maps[j].src_fd == p->srcs[i];
		if (!used) {
			close(p->srcs[i]);
			p->srcs[i] = p->srcs[--p->nsrcs];
		}
	}
	for (int i = p->nlinks - 1; i >= 0; i--) {
		int used = 0;
		for (int j = 0; j < p->nmaps && !used; j++)
			used = p->maps[j].link == p->links[i];
		if (!used) {
			pyuffd_link_put(p->links[i]);
			p->links[i] = p->links[--p->nlinks];
		}
	}
}

/*
 * Fill the bounce buffer for a MEMORY-less source: zeros, a pread of the
 * file, or one read over a REMOTE map's link (bounded by the map's timeout,
 * ended by pyuffd_pump_stop or a kill). The read runs with the lock
 * released (a slow disk or server must not stall the watchdog, which
 * enforces every other fault's deadline, and never reads the source: only
 * this thread, inside pyuffd_pump_wait, serves natively); the map may
 * change meanwhile, so the caller looks it up again. Lock held on entry and
 * on return; returns 0 or -errno (-EIO: the link is busy or dead, or the
 * server refused the read).
 */
static int fill_bounce(struct pyuffd_pump *p, const struct map *m, uint64_t offset, uint64_t len)
{
	int rc = ensure_buffer(&p->bounce, &p->bounce_len, len);
	if (rc < 0)
		return rc;
	if (m->source == PYUFFD_SOURCE_ZERO) {
		memset(p->bounce, 0, len);
		return 0;
	}
	int source = m->source, src_fd = m->src_fd;
	struct pyuffd_link *link = m->link;
	uint32_t region = m->region;
	uint64_t timeout = m->timeout_ns;
	p->reading = 1;
	pthread_mutex_unlock(&p->lock);
	if (source == PYUFFD_SOURCE_REMOTE) {
		rc = pyuffd_link_read(link, region, offset, p->bounce, len, timeout, p->stopfd) ? -EIO : 0;
	} else {
		ssize_t n = pread(src_fd, p->bounce, len, (off_t)offset);
		rc = n < 0 ? -errno : 0;
		/* Past the end of the file reads as zeros. */
		if (n >= 0)
			memset((char *)p->bounce + n, 0, len - (uint64_t)n);
	}
	lock_for_fault(p);
	p->reading = 0;
	sweep_srcs(p);
	return rc;
}

/*
 * Serve a MISSING fault from a native source; 1 if served, 0 to hand it to
 * Python. While faults are sequential the pump installs a growing run of
 * pages from the faulting one on (up to max_run bytes), in one UFFDIO_COPY:
 * the kernel stops at the first page already present, and wakes once.
 */
static int serve_native(struct pyuffd_pump *p, int fd, const struct uffd_msg *msg, uint64_t t_read,
			int dontwake, uint64_t *lo, uint64_t *hi)
{
	uint64_t flags = msg->arg.pagefault.flags;
	uint64_t addr = msg->arg.pagefault.address;
	if (flags & (UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_MINOR))
		return 0;
	struct map *m = find_map(p, fd, addr);
	if (!m || m->source == PYUFFD_SOURCE_NONE)
		return 0;
	uint64_t ps = m->page_size;
	uint64_t page = addr & ~(ps - 1);
	struct pyuffd_link *notes = m->link;
	if (notes && pyuffd_link_dead(notes))
		return 0; /* the owner stopped native serving (its source failed): Python decides */
	uint64_t off = page - m->start;
	uint64_t run = (page == m->next && m->run * 2 <= m->max_run) ? m->run * 2 : page == m->next ? m->run : ps;
	uint64_t len = run < m->end - page ? run : m->end - page;
	uint64_t start = m->start;
	int64_t done = 0;
	uint64_t mode = dontwake ? UFFDIO_COPY_MODE_DONTWAKE : 0;
	int rc;
	if (m->source == PYUFFD_SOURCE_ZERO && ps == (uint64_t)sysconf(_SC_PAGESIZE)) {
		rc = pyuffd_zeropage(fd, page, len, dontwake ? UFFDIO_ZEROPAGE_MODE_DONTWAKE : 0, &done);
	} else if (m->source == PYUFFD_SOURCE_MEMORY) {
		rc = pyuffd_copy(fd, page, m->src_addr + off, len, mode, &done);
	} else {
		rc = fill_bounce(p, m, m->src_offset + off, len);
		/* The lock was released: install only if the same map still holds the page. */
		m = find_map(p, fd, page);
		if (rc < 0 || !m || m->start != start || m->source == PYUFFD_SOURCE_NONE || m->link != notes)
			return 0;
		rc = pyuffd_copy(fd, page, (uint64_t)(uintptr_t)p->bounce, len, mode, &done);
	}
	if (rc == -EEXIST && done == 0)
		rc = dontwake ? 0 : pyuffd_wake(fd, page, ps); /* someone installed it first */
	else if (done > 0)
		rc = 0; /* the faulting page is in; the run stopped at a present page */
	if (rc < 0)
		return 0; /* EAGAIN and the like: Python knows what to do */
	m->run = run;
	m->next = page + (done > (int64_t)ps ? (uint64_t)done : ps);
	p->native_faults++;
	if (notes)
		pyuffd_link_note(notes, page, pyuffd_now_ns() - t_read); /* referenced: the map uses it */
	if (page < *lo)
		*lo = page;
	if (page + ps > *hi)
		*hi = page + ps;
	return 1;
}

/*
 * Stop watching fd (it failed or was removed): lock held. Order is kept, and
 * every loop over p->fds runs from the last index down, so removing the fd
 * being visited never makes a loop skip another.
 */
static void forget_fd(struct pyuffd_pump *p, int fd)
{
	epoll_ctl(p->epfd, EPOLL_CTL_DEL, fd, NULL);
	for (int i = 0; i < p->npaused; i++)
		if (p->paused[i] == fd)
			p->paused[i--] = p->paused[--p->npaused];
	for (int i = 0; i < p->nfds; i++) {
		if (p->fds[i] == fd) {
			memmove(&p->fds[i], &p->fds[i + 1], (size_t)(p->nfds - i - 1) * sizeof(p->fds[0]));
			p->nfds--;
			i--;
		}
	}
}

/*
 * Read what is pending on fd (non-blocking) into items (up to max) or, when
 * items is NULL, into the backlog (room for what one read can return is
 * reserved first; without it nothing is read, and the kernel keeps the
 * messages). Page faults get a slot. When one read returns several faults,
 * native ones are installed with DONTWAKE and woken with one UFFDIO_WAKE
 * over their span. Lock held (serve_native may release it for a pread).
 */
static int read_fd(struct pyuffd_pump *p, int fd, struct pyuffd_item *items, int max, uint64_t deadline_ns)
{
	struct uffd_msg msgs[READ_BATCH];
	int n = 0;
	if (max > READ_BATCH)
		max = READ_BATCH;
	if (!items && backlog_reserve(p, max) < 0)
		return 0;
	ssize_t got = read(fd, msgs, (size_t)max * sizeof(msgs[0]));
	uint64_t t = pyuffd_now_ns();
	if (got < 0) {
		if (errno == EAGAIN || errno == EINTR)
			return 0;
		struct pyuffd_item err = { .fd = fd, .t_ns = t };
		err.msg.event = PYUFFD_EVENT_FD_ERROR;
		err.msg.arg.pagefault.flags = (uint64_t)errno;
		forget_fd(p, fd);
		if (items) {
			items[0] = err;
			return 1;
		}
		backlog_push(p, &err);
		return 0;
	}
	int count = (int)(got / (ssize_t)sizeof(msgs[0]));
	int dontwake = count > 1;
	uint64_t lo = UINT64_MAX, hi = 0;
	/*
	 * Python must apply an event to the mapping table before faults near it
	 * are served. read() returns pending faults ahead of pending events, and
	 * the event's sender (madvise, mremap) resumes as soon as it is read: a
	 * fault installed natively now could land after MADV_DONTNEED's zap. So
	 * a batch holding any event is all handed to Python, in order.
	 */
	int native_ok = items != NULL;
	for (int i = 0; i < count && native_ok; i++)
		if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
			native_ok = 0;
	for (int i = 0; i < count; i++) {
		struct pyuffd_item item = { .fd = fd, .slot = 0, .t_ns = t, .msg = msgs[i] };
		if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
			p->events_read++;
		if (msgs[i].event == UFFD_EVENT_PAGEFAULT) {
			if (native_ok && serve_native(p, fd, &msgs[i], t, dontwake, &lo, &hi))
				continue;
			item.slot = slot_alloc(p, fd, &msgs[i], t + deadline_ns);
		}
		if (items)
			items[n++] = item;
		else
			backlog_push(p, &item);
	}
	if (dontwake && hi > lo) /* a single fault's UFFDIO_COPY woke its thread already */
		pyuffd_wake(fd, lo, hi - lo);
	return n;
}

static void *watchdog_main(void *arg)
{
	struct pyuffd_pump *p = arg;
	uint64_t tick = p->deadline_ns / 10;
	if (tick < 2000000)
		tick = 2000000;
	if (tick > 50000000)
		tick = 50000000;
	pthread_mutex_lock(&p->lock);
	while (!p->destroying) {
		struct timespec until;
		clock_gettime(CLOCK_MONOTONIC, &until);
		uint64_t ns = (uint64_t)until.tv_nsec + tick;
		until.tv_sec += (time_t)(ns / 1000000000ull);
		until.tv_nsec = (long)(ns % 1000000000ull);
		pthread_cond_timedwait(&p->tick, &p->lock, &until);
		if (p->destroying)
			break;
		uint64_t now = pyuffd_now_ns();
		int pushed = 0;
		/*
		 * The dispatch thread is stuck (a slow handler, a thread holding the
		 * GIL, fork() in this process waiting for its FORK event to be read):
		 * take over reading soon, so nothing waits on it; those faults get
		 * what is left of the deadline.
		 */
		uint64_t takeover = p->deadline_ns / 2 < TAKEOVER_NS ? p->deadline_ns / 2 : TAKEOVER_NS;
		if (!p->in_wait && !p->stopping && now - p->left_wait_ns > takeover) {
			int before = p->bl_count;
			for (int i = p->nfds - 1; i >= 0; i--)
				if (i < p->nfds)
					read_fd(p, p->fds[i], NULL, READ_BATCH, p->deadline_ns - takeover);
			pushed |= p->bl_count != before;
		}
		for (int i = 0; i < NSLOTS; i++) {
			struct slot *s = &p->slots[i];
			if (s->state != SLOT_PENDING || s->deadline_ns > now)
				continue;
			if (backlog_reserve(p, 1) < 0)
				break; /* no room for the notice: resolve it at the next tick */
			int did = do_fallback(p, s->fd, s->addr, s->flags, s->ptid);
			struct pyuffd_item note = { .fd = s->fd, .slot = (uint32_t)(did < 0 ? 0 : did), .t_ns = now };
			note.msg.event = PYUFFD_EVENT_EXPIRED;
			note.msg.arg.pagefault.address = s->addr;
			note.msg.arg.pagefault.flags = s->flags;
			note.msg.arg.pagefault.feat.ptid = s->ptid;
			s->state = SLOT_FREE;
			backlog_push(p, &note);
			pushed = 1;
		}
		if (pushed)
			kick(p->kickfd);
	}
	pthread_mutex_unlock(&p->lock);
	return NULL;
}

struct pyuffd_pump *pyuffd_pump_new(uint64_t deadline_ns)
{
	struct pyuffd_pump *p = calloc(1, sizeof(*p));
	if (!p)
		return NULL;
	p->deadline_ns = deadline_ns;
	p->left_wait_ns = pyuffd_now_ns();
	p->epfd = epoll_create1(EPOLL_CLOEXEC);
	p->stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	p->kickfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	int err = p->epfd < 0 || p->stopfd < 0 || p->kickfd < 0 ? errno : 0;
	struct epoll_event ev = { .events = EPOLLIN };
	ev.data.fd = p->stopfd;
	if (!err && epoll_ctl(p->epfd, EPOLL_CTL_ADD, p->stopfd, &ev) < 0)
		err = errno;
	ev.data.fd = p->kickfd;
	if (!err && epoll_ctl(p->epfd, EPOLL_CTL_ADD, p->kickfd, &ev) < 0)
		err = errno;
	int inited = 0;
	if (!err) {
		pthread_condattr_t ca;
		pthread_mutex_init(&p->lock, NULL);
		pthread_condattr_init(&ca);
		pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
		pthread_cond_init(&p->tick, &ca);
		pthread_condattr_destroy(&ca);
		inited = 1;
		err = pthread_create(&p->watchdog, NULL, watchdog_main, p);
	}
	if (!err)
		return p;
	if (inited) {
		pthread_mutex_destroy(&p->lock);
		pthread_cond_destroy(&p->tick);
	}
	for (int i = 0; i < 3; i++) {
		int fd = i == 0 ? p->epfd : i == 1 ? p->stopfd : p->kickfd;
		if (fd >= 0)
			close(fd);
	}
	free(p);
	errno = err;
	return NULL;
}

void pyuffd_pump_free(struct pyuffd_pump *p)
{
	pthread_mutex_lock(&p->lock);
	p->destroying = 1;
	pthread_cond_signal(&p->tick);
	pthread_mutex_unlock(&p->lock);
	pthread_join(p->watchdog, NULL);
	close(p->epfd);
	close(p->stopfd);
	close(p->kickfd);
	p->nmaps = 0;
	sweep_srcs(p); /* closes every source dup */
	free(p->maps);
	free(p->srcs);
	free(p->links);
	pages_free(p->backlog, (size_t)p->bl_cap * sizeof(*p->backlog));
	pages_free(p->zero_page, p->zero_len);
	pages_free(p->bounce, p->bounce_len);
	pthread_mutex_destroy(&p->lock);
	pthread_cond_destroy(&p->tick);
	free(p);
}

/*
 * Take fd's faults, or (paused) only keep it in the tables: a paused fd is in
 * no epoll set and no loop over p->fds, so neither the dispatch thread nor the
 * watchdog reads it until pyuffd_pump_serve_fd, and its owner can publish its
 * maps on a running pump before the first fault is read.
 */
int pyuffd_pump_add_fd(struct pyuffd_pump *p, int fd, int paused)
{
	struct epoll_event ev = { .events = EPOLLIN };
	ev.data.fd = fd;
	/*
	 * A blocking userfaultfd always polls as EPOLLERR (the kernel cannot
	 * promise that read() will not block), and the pump reads under its
	 * lock: it needs O_NONBLOCK. The flag is on the open file, so a peer
	 * that sent us its fd sees it too; userfaultfd owners do not read.
	 */
	int fl = fcntl(fd, F_GETFL);
	if (fl < 0 || (!(fl & O_NONBLOCK) && fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0))
		return -errno;
	pthread_mutex_lock(&p->lock);
	int rc = p->nfds + p->npaused == MAX_FDS ? -EMFILE : 0;
	if (rc == 0 && paused)
		p->paused[p->npaused++] = fd;
	else if (rc == 0 && epoll_ctl(p->epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
		rc = -errno;
	else if (rc == 0)
		p->fds[p->nfds++] = fd;
	pthread_mutex_unlock(&p->lock);
	return rc;
}

/* Start reading a paused fd (its faults raised meanwhile are read at once); -ENOENT if not paused. */
int pyuffd_pump_serve_fd(struct pyuffd_pump *p, int fd)
{
	struct epoll_event ev = { .events = EPOLLIN };
	ev.data.fd = fd;
	pthread_mutex_lock(&p->lock);
	int rc = -ENOENT;
	for (int i = 0; i < p->npaused && rc == -ENOENT; i++) {
		if (p->paused[i] != fd)
			continue;
		rc = epoll_ctl(p->epfd, EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
		if (rc == 0) {
			p->paused[i] = p->paused[--p->npaused];
			p->fds[p->nfds++] = fd;
		}
	}
	pthread_mutex_unlock(&p->lock);
	return rc;
}

/*
 * Stop serving fd: its maps go, and so do its pending slots (a later FORK
 * may reuse the number for another child, whose page a fallback meant for
 * this one must never touch). Whoever removes an fd answers for its faults.
 */
int pyuffd_pump_remove_fd(struct pyuffd_pump *p, int fd)
{
	pthread_mutex_lock(&p->lock);
	forget_fd(p, fd);
	for (int i = 0; i < p->nmaps; i++)
		if (p->maps[i].fd == fd)
			p->maps[i--] = p->maps[--p->nmaps];
	for (int i = 0; i < NSLOTS; i++)
		if (p->slots[i].state == SLOT_PENDING && p->slots[i].fd == fd)
			p->slots[i].state = SLOT_FREE;
	sweep_srcs(p);
	pthread_mutex_unlock(&p->lock);
	return 0;
}

/*
 * Serve [start, end) of fd's faults with a fallback and a source. A FILE
 * source's fd is dup'ed: the pump reads its own copy for as long as a map
 * uses it, so the owner closing its fd (and the number being reused by
 * another file) never makes the pump read the wrong file. A link (a
 * REMOTE source's, or for another source where its served faults are
 * noted) is referenced by the pump for as long as a map uses it.
 */
int pyuffd_pump_map(struct pyuffd_pump *p, int fd, uint64_t start, uint64_t end, uint64_t page_size,
		    int fallback, int source, uint64_t src_addr, int src_fd, uint64_t src_offset,
		    uint64_t max_run, struct pyuffd_link *link, uint32_t region, uint64_t timeout_ns)
{
	pthread_mutex_lock(&p->lock);
	int rc = grow((void **)&p->maps, &p->maps_cap, p->nmaps + 1, sizeof(struct map));
	if (rc == 0 && source == PYUFFD_SOURCE_FILE) {
		rc = grow((void **)&p->srcs, &p->srcs_cap, p->nsrcs + 1, sizeof(int));
		src_fd = rc ? -1 : fcntl(src_fd, F_DUPFD_CLOEXEC, 0);
		if (rc == 0 && src_fd < 0)
			rc = -errno;
		if (rc == 0)
			p->srcs[p->nsrcs++] = src_fd;
	}
	if (rc == 0 && link) {
		int known = 0;
		for (int i = 0; i < p->nlinks && !known; i++)
			known = p->links[i] == link;
		rc = known ? 0 : grow((void **)&p->links, &p->links_cap, p->nlinks + 1, sizeof(link));
		if (rc == 0 && !known) {
			pyuffd_link_get(link);
			p->links[p->nlinks++] = link;
		}
	}
	if (source == PYUFFD_SOURCE_REMOTE)
		max_run = page_size; /* one page a fault: prefetch brings the runs */
	if (rc == 0)
		p->maps[p->nmaps++] = (struct map){ fd, start, end, page_size, fallback, source, src_fd,
						    src_addr, src_offset, max_run > page_size ? max_run : page_size,
						    page_size, 0, link,
						    region, timeout_ns };
	pthread_mutex_unlock(&p->lock);
	return rc;
}

/* Drop [start, end) of fd's maps, keeping the parts outside it. */
int pyuffd_pump_unmap(struct pyuffd_pump *p, int fd, uint64_t start, uint64_t end)
{
	pthread_mutex_lock(&p->lock);
	/* The pieces kept need at most two more entries per map cut: room first, then no failure. */
	int rc = grow((void **)&p->maps, &p->maps_cap, p->nmaps + 2, sizeof(struct map));
	for (int i = 0; rc == 0 && i < p->nmaps; i++) {
		struct map m = p->maps[i];
		if (m.fd != fd || m.end <= start || m.start >= end)
			continue;
		p->maps[i--] = p->maps[--p->nmaps];
		if (m.start < start) {
			struct map head = m;
			head.end = start;
			p->maps[p->nmaps++] = head;
		}
		if (m.end > end) {
			struct map tail = m;
			tail.src_addr += m.source == PYUFFD_SOURCE_MEMORY ? end - m.start : 0;
			tail.src_offset += m.source == PYUFFD_SOURCE_FILE || m.source == PYUFFD_SOURCE_REMOTE
						   ? end - m.start
						   : 0;
			tail.start = end;
			p->maps[p->nmaps++] = tail;
		}
	}
	sweep_srcs(p);
	pthread_mutex_unlock(&p->lock);
	return rc;
}

/*
 * Before blocking, poll the fds for up to spin_ns (restarted by every fault
 * served natively): a fault that follows within the window is taken without
 * an epoll sleep and a cross-CPU wake-up, which dominate fault latency when
 * the handler runs on another CPU than the faulting thread.
 */
static int spin(struct pyuffd_pump *p, struct pyuffd_item *items, int max_items)
{
	uint64_t until = pyuffd_now_ns() + p->spin_ns;
	uint64_t served = p->native_faults;
	for (;;) {
		/*
		 * While reads find one message at a time (one faulting thread), ask
		 * for one: a larger read makes the kernel look for a second message
		 * too, which cost 2-3 % of a same-CPU fault. Every 8th read asks for
		 * a full batch, so concurrent faults are batched again at once.
		 */
		int n = 0;
		uint64_t before = p->native_faults;
		for (int i = p->nfds - 1; i >= 0 && n < max_items; i--)
			if (i < p->nfds)
				n += read_fd(p, p->fds[i], items + n, p->lone_reads % 8 ? 1 : max_items - n,
					     p->deadline_ns);
		if (n + p->native_faults - before == 1)
			p->lone_reads++;
		else if (n + p->native_faults - before > 1)
			p->lone_reads = 0;
		if (n || p->bl_count || __atomic_load_n(&p->stop_requested, __ATOMIC_RELAXED))
			return n;
		uint64_t t = pyuffd_now_ns();
		if (p->native_faults != served) {
			/*
			 * Read again before yielding: on a shared CPU the woken thread
			 * ran at once and its next fault is likely pending already, and
			 * a sched_yield per fault cost ~0.5 us (1.16x the C handler).
			 */
			served = p->native_faults;
			until = t + p->spin_ns;
			continue;
		}
		if (t >= until)
			return 0;
		pthread_mutex_unlock(&p->lock);
		sched_yield();
		lock_for_fault(p);
	}
}

int pyuffd_pump_wait(struct pyuffd_pump *p, struct pyuffd_item *items, int max_items, int timeout_ms)
{
	struct epoll_event evs[16];
	int n = 0;
	int spun = 0;
	lock_for_fault(p);
	p->in_wait = 1;
	for (;;) {
		while (p->bl_count && n < max_items) {
			items[n++] = p->backlog[p->bl_head];
			p->bl_head = (p->bl_head + 1) % p->bl_cap;
			p->bl_count--;
		}
		if (__atomic_load_n(&p->stop_requested, __ATOMIC_RELAXED))
			p->stopping = 1;
		if (n || p->stopping)
			break;
		if (p->spin_ns && !spun) {
			spun = 1;
			n = spin(p, items, max_items);
			continue;
		}
		pthread_mutex_unlock(&p->lock);
		int ready = epoll_wait(p->epfd, evs, 16, timeout_ms);
		int err = errno;
		lock_for_fault(p);
		if (ready < 0) {
			n = -err;
			break;
		}
		if (ready == 0) {
			n = -ETIMEDOUT;
			break;
		}
		for (int i = 0; i < ready && n < max_items; i++) {
			int fd = evs[i].data.fd;
			if (fd == p->stopfd) {
				p->stopping = 1;
			} else if (fd == p->kickfd) {
				uint64_t v;
				ssize_t rc = read(fd, &v, sizeof(v));
				(void)rc;
			} else {
				n += read_fd(p, fd, items + n, max_items - n, p->deadline_ns);
			}
		}
		spun = 0; /* woken by a fault: spin again for the next one */
	}
	p->in_wait = 0;
	p->left_wait_ns = pyuffd_now_ns();
	pthread_mutex_unlock(&p->lock);
	return n;
}

void pyuffd_pump_set_spin(struct pyuffd_pump *p, uint64_t spin_ns)
{
	pthread_mutex_lock(&p->lock);
	p->spin_ns = spin_ns;
	pthread_mutex_unlock(&p->lock);
}

int pyuffd_pump_resolve(struct pyuffd_pump *p, int fd, uint32_t id, int op, uint64_t dst,
			const char *src, uint64_t len, uint64_t mode, int64_t *done)
{
	lock_for_fault(p);
	struct slot *s = slot_get(p, id);
	if (id != UINT32_MAX && (!s || s->state != SLOT_PENDING)) {
		pthread_mutex_unlock(&p->lock);
		*done = 0;
		return -ETIME; /* the watchdog resolved it already */
	}
	if (s)
		s->state = SLOT_RESOLVING;
	pthread_mutex_unlock(&p->lock);

	int rc;
	*done = 0;
	switch (op) {
	case PYUFFD_OP_COPY: rc = pyuffd_copy(fd, dst, (uint64_t)(uintptr_t)src, len, mode, done); break;
	case PYUFFD_OP_ZEROPAGE: rc = pyuffd_zeropage(fd, dst, len, mode, done); break;
	case PYUFFD_OP_CONTINUE: rc = pyuffd_continue(fd, dst, len, mode, done); break;
	case PYUFFD_OP_POISON: rc = pyuffd_poison(fd, dst, len, mode, done); break;
	case PYUFFD_OP_UNPROTECT: rc = pyuffd_writeprotect(fd, dst, len, mode); break;
	case PYUFFD_OP_WAKE: rc = pyuffd_wake(fd, dst, len); break;
	default: rc = -EINVAL;
	}
	/*
	 * EEXIST on a WP or MINOR fault (other than CONTINUE's) is no resolution:
	 * the page was there all along and the thread would only fault again.
	 * The slot stays pending for Python, which copies over it or falls back.
	 */
	int present = rc == -EEXIST && s && (s->flags & (UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_MINOR)) &&
		      op != PYUFFD_OP_CONTINUE;
	if ((rc == -EEXIST && !present) || rc == -ENOENT) {
		/* Resolved by someone else, or unregistered under us: waking the thread is all. */
		rc = pyuffd_wake(fd, dst, len);
	}
	if (s) {
		lock_for_fault(p);
		if (present || rc < 0)
			s->state = SLOT_PENDING; /* still unresolved: Python falls back or the deadline will */
		else
			s->state = SLOT_FREE;
		pthread_mutex_unlock(&p->lock);
	}
	return rc;
}

/*
 * UFFDIO_COPY for a prefetch, refused with -EAGAIN unless Python has applied
 * every event read so far (events_seen). Once a REMOVE is read the process
 * goes on to drop the pages, and a copy landing after that would bring old
 * contents back: doing the check and the copy under the lock the reads take
 * orders every install before the read or after the table update.
 */
int pyuffd_pump_install(struct pyuffd_pump *p, int fd, uint64_t dst, const char *src, uint64_t len,
			uint64_t mode, uint64_t events_seen, int64_t *done)
{
	/*
	 * A mutex is not fair: an install that takes it again right after its
	 * last step beats a fault-path thread just woken for it, step after
	 * step (measured: faults waited 0.3-0.7 ms for the lock during a C
	 * install loop). Let such a thread go first, for at most 200 us.
	 */
	uint64_t until = 0;
	while (__atomic_load_n(&p->fault_waiting, __ATOMIC_SEQ_CST)) {
		uint64_t t = pyuffd_now_ns();
		if (!until)
			until = t + 200000;
		else if (t >= until)
			break;
		sched_yield();
	}
	pthread_mutex_lock(&p->lock);
	int rc = p->events_read == events_seen
			 ? pyuffd_copy(fd, dst, (uint64_t)(uintptr_t)src, len, mode, done)
			 : (*done = 0, -EAGAIN);
	pthread_mutex_unlock(&p->lock);
	return rc;
}

int pyuffd_pump_fallback(struct pyuffd_pump *p, uint32_t id)
{
	lock_for_fault(p);
	struct slot *s = slot_get(p, id);
	int rc;
	if (!s || s->state != SLOT_PENDING) {
		rc = -ETIME;
	} else {
		rc = do_fallback(p, s->fd, s->addr, s->flags, s->ptid);
		s->state = SLOT_FREE;
	}
	pthread_mutex_unlock(&p->lock);
	return rc;
}

/*
 * Resolve every pending fault by fallback (shutdown); returns how many. The
 * faults waiting unread on paused fds are read first: nobody else ever will.
 */
int pyuffd_pump_drain(struct pyuffd_pump *p)
{
	int n = 0;
	pthread_mutex_lock(&p->lock);
	for (int i = p->npaused - 1; i >= 0; i--) {
		int before;
		do {
			before = p->bl_count;
			if (i < p->npaused)
				read_fd(p, p->paused[i], NULL, READ_BATCH, 0);
		} while (p->bl_count != before);
	}
	for (int i = 0; i < NSLOTS; i++) {
		struct slot *s = &p->slots[i];
		if (s->state != SLOT_PENDING)
			continue;
		do_fallback(p, s->fd, s->addr, s->flags, s->ptid);
		s->state = SLOT_FREE;
		n++;
	}
	pthread_mutex_unlock(&p->lock);
	return n;
}

int pyuffd_pump_stop(struct pyuffd_pump *p)
{
	__atomic_store_n(&p->stop_requested, 1, __ATOMIC_RELAXED);
	kick(p->stopfd);
	return 0;
}

uint64_t pyuffd_pump_events_read(struct pyuffd_pump *p)
{
	pthread_mutex_lock(&p->lock);
	uint64_t n = p->events_read;
	pthread_mutex_unlock(&p->lock);
	return n;
}

uint64_t pyuffd_pump_native_faults(struct pyuffd_pump *p)
{
	pthread_mutex_lock(&p->lock);
	uint64_t n = p->native_faults;
	pthread_mutex_unlock(&p->lock);
	return n;
}
