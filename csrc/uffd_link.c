/*
 * A page server's fault-only connection, read by the pump (PYUFFD_SOURCE_REMOTE).
 *
 * The wire format is docs/protocol.md: one READ frame per fault (URGENT),
 * its reply (DATA/ZERO frames in order, then END, or an ERROR) received
 * into the caller's page buffer, checked exactly as uffd/restore/urgent.py
 * (UrgentLink._reply) checks it. One request at a time: the link carries
 * nothing else, so after END no byte may be left over.
 *
 * Lifetime: reference counted (Python's RemoteLink holds one, every pump
 * that maps it one more); the socket is closed with the last reference, so
 * no number is ever closed under a reader. Any failure but a refused read
 * kills the link for good: its socket is shut down and never read again,
 * and the faults go to Python's path.
 *
 * A link made with fd -1 has no socket: it is only the ring (and the kill
 * switch) for the faults the pump serves from another source, a file's
 * mapping (PYUFFD_SOURCE_MEMORY with a link): reads on it are refused.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "uffd_pump.h"

#define MAGIC 0x5546
#define HEADER 16
#define T_READ 5
#define T_DATA 6
#define T_ZERO 7
#define T_END 8
#define T_ERROR 9
#define F_URGENT 0x0001
#define MAX_CONTROL (64u << 10) /* ZERO, END, ERROR are small: a longer one is garbage */
#define RX (MAX_CONTROL + HEADER)
#define RING 4096 /* served faults kept for Python; older ones are counted, not kept */

struct pyuffd_link {
	int fd;       /* the socket, owned */
	int wakefd;   /* pyuffd_link_kill: ends a wait on the socket */
	int notifyfd; /* readable while served faults wait in the ring, or once dead */
	int version;
	uint32_t max_frame;
	uint32_t next_id;
	int refs;  /* atomic */
	int busy;  /* atomic: a reader is on the socket */
	int dead;  /* atomic: 0 alive, else the errno that killed it */
	pthread_mutex_t ring_lock;
	uint64_t ring[RING][2]; /* address, latency (ns) */
	uint32_t head, count;
	uint64_t lost;
	uint32_t start, end; /* read-ahead bytes rx[start, end) */
	uint8_t rx[RX];
};

static void put_be(uint8_t *p, uint64_t v, int n)
{
	for (int i = n - 1; i >= 0; i--, v >>= 8)
		p[i] = (uint8_t)v;
}

static uint64_t get_be(const uint8_t *p, int n)
{
	uint64_t v = 0;
	for (int i = 0; i < n; i++)
		v = v << 8 | p[i];
	return v;
}

static void signal_fd(int efd)
{
	uint64_t one = 1;
	ssize_t rc = write(efd, &one, sizeof(one));
	(void)rc;
}

struct pyuffd_link *pyuffd_link_new(int fd, int version, uint32_t max_frame)
{
	struct pyuffd_link *l = calloc(1, sizeof(*l));
	if (!l)
		return NULL;
	l->fd = fd;
	l->version = version;
	l->max_frame = max_frame;
	l->refs = 1;
	l->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	l->notifyfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (l->wakefd < 0 || l->notifyfd < 0) {
		int err = errno;
		if (l->wakefd >= 0)
			close(l->wakefd);
		if (l->notifyfd >= 0)
			close(l->notifyfd);
		free(l);
		errno = err;
		return NULL;
	}
	pthread_mutex_init(&l->ring_lock, NULL);
	return l;
}

void pyuffd_link_get(struct pyuffd_link *l)
{
	__atomic_add_fetch(&l->refs, 1, __ATOMIC_RELAXED);
}

void pyuffd_link_put(struct pyuffd_link *l)
{
	if (__atomic_sub_fetch(&l->refs, 1, __ATOMIC_ACQ_REL))
		return;
	if (l->fd >= 0)
		close(l->fd);
	close(l->wakefd);
	close(l->notifyfd);
	pthread_mutex_destroy(&l->ring_lock);
	free(l);
}

/* Mark the link dead (the first reason stays) and tell Python; the socket is shut by its reader. */
static void set_dead(struct pyuffd_link *l, int err)
{
	int alive = 0;
	if (__atomic_compare_exchange_n(&l->dead, &alive, err, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
		signal_fd(l->notifyfd);
}

int pyuffd_link_dead(struct pyuffd_link *l)
{
	return __atomic_load_n(&l->dead, __ATOMIC_ACQUIRE);
}

int pyuffd_link_notify_fd(struct pyuffd_link *l)
{
	return l->notifyfd;
}

/*
 * Stop using the link (Python: the session's source failed, or it ends).
 * A read in progress ends at once (its wait watches wakefd) and shuts the
 * socket; with none, the socket is shut here, holding the reader's place.
 */
void pyuffd_link_kill(struct pyuffd_link *l)
{
	set_dead(l, ECANCELED);
	signal_fd(l->wakefd);
	if (l->fd >= 0 && !__atomic_exchange_n(&l->busy, 1, __ATOMIC_ACQUIRE)) {
		shutdown(l->fd, SHUT_RDWR);
		__atomic_store_n(&l->busy, 0, __ATOMIC_RELEASE);
	}
}

/* Record a fault served at addr for Python (progress, latency); never blocks for long. */
void pyuffd_link_note(struct pyuffd_link *l, uint64_t addr, uint64_t latency_ns)
{
	pthread_mutex_lock(&l->ring_lock);
	if (l->count == RING) {
		l->head = (l->head + 1) % RING;
		l->count--;
		l->lost++;
	}
	l->ring[(l->head + l->count) % RING][0] = addr;
	l->ring[(l->head + l->count) % RING][1] = latency_ns;
	int was_empty = l->count++ == 0;
	pthread_mutex_unlock(&l->ring_lock);
	if (was_empty)
		signal_fd(l->notifyfd);
}

/* Move up to max served faults into out (pairs: address, latency), oldest first; *lost: those dropped since. */
int pyuffd_link_take(struct pyuffd_link *l, uint64_t *out, int max, uint64_t *lost)
{
	uint64_t v;
	ssize_t rc = read(l->notifyfd, &v, sizeof(v)); /* re-armed by the next note */
	(void)rc;
	pthread_mutex_lock(&l->ring_lock);
	int n = 0;
	while (l->count && n < max) {
		out[2 * n] = l->ring[l->head][0];
		out[2 * n + 1] = l->ring[l->head][1];
		n++;
		l->head = (l->head + 1) % RING;
		l->count--;
	}
	*lost = l->lost;
	l->lost = 0;
	int more = l->count != 0;
	pthread_mutex_unlock(&l->ring_lock);
	if (more || pyuffd_link_dead(l))
		signal_fd(l->notifyfd); /* still something to say */
	return n;
}

/*
 * Wait (poll) until the socket is ready for ev, before until; stopfd (the
 * pump's stop eventfd, or -1) and a kill end the wait. 0 or -errno.
 */
static int wait_ready(struct pyuffd_link *l, short ev, uint64_t until, int stopfd)
{
	for (;;) {
		int dead = pyuffd_link_dead(l);
		if (dead)
			return -dead;
		uint64_t t = pyuffd_now_ns();
		if (t >= until)
			return -ETIMEDOUT;
		struct pollfd pf[3] = { { l->fd, ev, 0 }, { l->wakefd, POLLIN, 0 }, { stopfd, POLLIN, 0 } };
		uint64_t left = until - t;
		struct timespec ts = { (time_t)(left / 1000000000ull), (long)(left % 1000000000ull) };
		int n = ppoll(pf, stopfd >= 0 ? 3 : 2, &ts, NULL);
		if (n < 0 && errno != EINTR)
			return -errno;
		if (n > 0 && (pf[1].revents || (stopfd >= 0 && pf[2].revents)))
			return -ECANCELED;
		if (n > 0 && pf[0].revents)
			return 0;
	}
}

static int send_all(struct pyuffd_link *l, const uint8_t *buf, size_t len, uint64_t until, int stopfd)
{
	while (len) {
		ssize_t n = send(l->fd, buf, len, MSG_DONTWAIT | MSG_NOSIGNAL);
		if (n > 0) {
			buf += n;
			len -= (size_t)n;
			continue;
		}
		if (n < 0 && errno != EAGAIN && errno != EINTR)
			return -errno;
		int rc = wait_ready(l, POLLOUT, until, stopfd);
		if (rc < 0)
			return rc;
	}
	return 0;
}

/* One recv of up to len bytes (at least one); -EPIPE when the server closed. */
static ssize_t recv_some(struct pyuffd_link *l, uint8_t *buf, size_t len, uint64_t until, int stopfd)
{
	for (;;) {
		ssize_t n = recv(l->fd, buf, len, MSG_DONTWAIT);
		if (n > 0)
			return n;
		if (n == 0)
			return -EPIPE;
		if (errno != EAGAIN && errno != EINTR)
			return -errno;
		int rc = wait_ready(l, POLLIN, until, stopfd);
		if (rc < 0)
			return rc;
	}
}

/* The next size bytes (size <= RX) from the read-ahead buffer, receiving what is missing. */
static const uint8_t *take(struct pyuffd_link *l, uint32_t size, uint64_t until, int stopfd, int *err)
{
	if (l->end - l->start < size) {
		memmove(l->rx, l->rx + l->start, l->end - l->start);
		l->end -= l->start;
		l->start = 0;
		while (l->end < size) {
			ssize_t n = recv_some(l, l->rx + l->end, RX - l->end, until, stopfd);
			if (n < 0) {
				*err = (int)n;
				return NULL;
			}
			l->end += (uint32_t)n;
		}
	}
	const uint8_t *out = l->rx + l->start;
	l->start += size;
	return out;
}

/* Fill dest from the read-ahead bytes, then straight from the socket. */
static int take_into(struct pyuffd_link *l, uint8_t *dest, uint64_t len, uint64_t until, int stopfd)
{
	uint64_t n = l->end - l->start < len ? l->end - l->start : len;
	memcpy(dest, l->rx + l->start, n);
	l->start += (uint32_t)n;
	if (l->start == l->end)
		l->start = l->end = 0;
	while (n < len) {
		ssize_t got = recv_some(l, dest + n, len - n, until, stopfd);
		if (got < 0)
			return (int)got;
		n += (uint64_t)got;
	}
	return 0;
}

#define NEED(ptr, size)                                   \
	do {                                              \
		(ptr) = take(l, (size), until, stopfd, &err); \
		if (!(ptr))                               \
			return err;                       \
	} while (0)

/*
 * The reply to READ rid of [offset, +len) into buf: the bytes served (> 0),
 * 0 when the server refused it (an ERROR frame for rid), or -errno when the
 * link is unusable (-EPROTO: the server broke the protocol).
 */
static int64_t reply(struct pyuffd_link *l, uint32_t rid, uint64_t offset, uint8_t *buf, uint64_t len,
		     uint64_t until, int stopfd)
{
	uint64_t placed = 0;
	int err = 0;
	for (;;) {
		const uint8_t *h, *body;
		NEED(h, HEADER);
		uint32_t magic = (uint32_t)get_be(h, 2), version = h[2], type = h[3];
		uint32_t flags = (uint32_t)get_be(h + 4, 2), reserved = (uint32_t)get_be(h + 6, 2);
		uint32_t got = (uint32_t)get_be(h + 8, 4), size = (uint32_t)get_be(h + 12, 4);
		if (magic != MAGIC || version < 1 || version > (uint32_t)l->version || flags || reserved ||
		    got != rid)
			return -EPROTO;
		if (size > l->max_frame || (type != T_DATA && size > MAX_CONTROL))
			return -EPROTO;
		if (type == T_DATA) {
			if (size < 8)
				return -EPROTO;
			NEED(body, 8);
			uint64_t at = get_be(body, 8), n = size - 8;
			if (at != offset + placed || placed + n > len)
				return -EPROTO;
			int rc = take_into(l, buf + placed, n, until, stopfd);
			if (rc < 0)
				return rc;
			placed += n;
		} else if (type == T_ZERO) {
			if (size != 16)
				return -EPROTO;
			NEED(body, 16);
			uint64_t at = get_be(body, 8), n = get_be(body + 8, 8);
			if (at != offset + placed || n > len - placed)
				return -EPROTO;
			memset(buf + placed, 0, n);
			placed += n;
		} else if (type == T_END) {
			if (size != 8)
				return -EPROTO;
			NEED(body, 8);
			if (get_be(body, 8) != placed || l->end > l->start)
				return -EPROTO;
			return (int64_t)placed;
		} else if (type == T_ERROR) {
			if (size < 2)
				return -EPROTO;
			NEED(body, size);
			return l->end > l->start ? -EPROTO : 0;
		} else {
			return -EPROTO;
		}
	}
}

/*
 * Receive [offset, +len) of region into buf: one READ, and one more per
 * short reply, all within timeout_ns. 0 when done; 1 when not read here (the
 * link is busy or dead, or the server refused the read: the link is kept);
 * -errno when this read killed the link.
 */
int pyuffd_link_read(struct pyuffd_link *l, uint32_t region, uint64_t offset, void *buf, uint64_t len,
		     uint64_t timeout_ns, int stopfd)
{
	if (l->fd < 0 || pyuffd_link_dead(l) || __atomic_exchange_n(&l->busy, 1, __ATOMIC_ACQUIRE))
		return 1;
	uint64_t until = pyuffd_now_ns() + timeout_ns;
	int64_t rc = 0;
	uint64_t placed = 0;
	if (pyuffd_link_dead(l))
		rc = 1; /* killed as we took the place: the kill shut nothing */
	while (rc == 0 && placed < len) {
		uint8_t frame[HEADER + 20];
		l->next_id = l->next_id % 0xFFFFFFFFu + 1;
		put_be(frame, MAGIC, 2);
		frame[2] = (uint8_t)l->version;
		frame[3] = T_READ;
		put_be(frame + 4, F_URGENT, 2);
		put_be(frame + 6, 0, 2);
		put_be(frame + 8, l->next_id, 4);
		put_be(frame + 12, 20, 4);
		put_be(frame + 16, region, 4);
		put_be(frame + 20, offset + placed, 8);
		put_be(frame + 28, len - placed, 8);
		rc = send_all(l, frame, sizeof(frame), until, stopfd);
		if (rc == 0)
			rc = reply(l, l->next_id, offset + placed, (uint8_t *)buf + placed, len - placed, until,
				   stopfd);
		if (rc > 0) {
			placed += (uint64_t)rc;
			rc = 0;
		} else if (rc == 0) {
			rc = 1; /* refused */
		}
	}
	if (rc < 0) {
		set_dead(l, (int)-rc);
		shutdown(l->fd, SHUT_RDWR);
	}
	__atomic_store_n(&l->busy, 0, __ATOMIC_RELEASE);
	return (int)rc;
}
