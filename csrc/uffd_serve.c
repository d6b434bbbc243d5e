/*
 * The page server's fault channel loop (see uffd_serve.h).  Frames are those
 * of docs/protocol.md: a 16-byte big-endian header (magic, version, type,
 * flags, reserved, request id, payload length), a READ's payload is region
 * u32, offset u64, length u64.  This loop accepts exactly what the Python
 * decoder accepts as a READ and serves exactly what the Python server would
 * send for it; every other case goes back to Python, so there is one place
 * that words each ERROR.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "uffd_serve.h"

#define MAGIC 0x5546
#define T_READ 5
#define T_DATA 6
#define T_ZERO 7
#define T_END 8
#define FLAG_URGENT 0x0001
#define HEADER 16
#define READ_PAYLOAD 20
#define MAX_FRAME_HEAD 32 /* a ZERO frame; a DATA header and offset take 24 */

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int done(struct pyuffd_serve_state *st, int reason, int err)
{
	st->reason = reason;
	st->err = err;
	return reason;
}

/*
 * Receive the 36 bytes of one READ frame into buf; 0 when they came, else a
 * PYUFFD_SERVE_* reason.  The idle deadline counts from *last (the last
 * activity); once a byte of the frame came, the rest must come within
 * frame_ms of it as well.  The header is checked before its payload is
 * waited for, as the Python decoder does.  A recv asks for the whole frame
 * at once: bytes past a header that is not a READ's are never needed, since
 * every such header ends the connection.
 */
static int recv_frame(const struct pyuffd_serve_config *cfg, int sock, uint8_t *buf,
		      int64_t *last, struct pyuffd_serve_state *st)
{
	size_t got = 0;
	int checked = 0;
	int64_t partial = -1;
	while (got < HEADER + READ_PAYLOAD) {
		ssize_t n = recv(sock, buf + got, HEADER + READ_PAYLOAD - got, MSG_DONTWAIT);
		if (n > 0) {
			*last = now_ms();
			if (partial < 0)
				partial = *last;
			got += (size_t)n;
			if (got >= HEADER && !checked) {
				uint16_t magic, flags, reserved;
				uint32_t length;
				memcpy(&magic, buf, 2);
				memcpy(&flags, buf + 4, 2);
				memcpy(&reserved, buf + 6, 2);
				memcpy(&length, buf + 12, 4);
				if (be16toh(magic) != MAGIC || buf[2] >= 32 ||
				    !(cfg->versions & (1u << buf[2])) || buf[3] != T_READ ||
				    (be16toh(flags) & ~FLAG_URGENT) || reserved ||
				    be32toh(length) != READ_PAYLOAD) {
					memcpy(st->header, buf, HEADER);
					return done(st, PYUFFD_SERVE_HEADER, 0);
				}
				checked = 1;
			}
			continue;
		}
		if (n == 0)
			return done(st, PYUFFD_SERVE_EOF, 0);
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN && errno != EWOULDBLOCK)
			return done(st, PYUFFD_SERVE_IO, errno);
		int64_t idle_end = *last + cfg->idle_ms;
		int64_t end = idle_end;
		int reason = PYUFFD_SERVE_IDLE;
		if (partial >= 0 && partial + cfg->frame_ms < idle_end) {
			end = partial + cfg->frame_ms;
			reason = PYUFFD_SERVE_PARTIAL;
		}
		int64_t left = end - now_ms();
		if (left <= 0)
			return done(st, reason, 0);
		struct pollfd pfd = {.fd = sock, .events = POLLIN};
		int r = poll(&pfd, 1, left > INT_MAX ? INT_MAX : (int)left);
		if (r < 0 && errno != EINTR)
			return done(st, PYUFFD_SERVE_IO, errno);
	}
	return 0;
}

/* Send iov[0..n) whole; 0, or a PYUFFD_SERVE_* reason.  Each wait for room is bounded by send_ms. */
static int send_all(const struct pyuffd_serve_config *cfg, int sock, struct iovec *iov, size_t n,
		    struct pyuffd_serve_state *st)
{
	while (n) {
		struct msghdr msg = {.msg_iov = iov, .msg_iovlen = n < IOV_MAX ? n : IOV_MAX};
		ssize_t sent = sendmsg(sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (sent < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				return done(st, PYUFFD_SERVE_IO, errno);
			struct pollfd pfd = {.fd = sock, .events = POLLOUT};
			int r = poll(&pfd, 1, cfg->send_ms);
			if (r == 0)
				return done(st, PYUFFD_SERVE_STALLED, 0);
			if (r < 0 && errno != EINTR)
				return done(st, PYUFFD_SERVE_IO, errno);
			continue;
		}
		size_t left = (size_t)sent;
		while (n && left >= iov->iov_len) {
			left -= iov->iov_len;
			iov++;
			n--;
		}
		if (n) {
			iov->iov_base = (uint8_t *)iov->iov_base + left;
			iov->iov_len -= left;
		}
	}
	return 0;
}

static void put_header(uint8_t *h, uint8_t version, uint8_t type, uint32_t rid, uint32_t length)
{
	uint16_t magic = htobe16(MAGIC), zero = 0;
	uint32_t id = htobe32(rid), len = htobe32(length);
	memcpy(h, &magic, 2);
	h[2] = version;
	h[3] = type;
	memcpy(h + 4, &zero, 2);
	memcpy(h + 6, &zero, 2);
	memcpy(h + 8, &id, 4);
	memcpy(h + 12, &len, 4);
}

static void put_u64(uint8_t *at, uint64_t value)
{
	uint64_t be = htobe64(value);
	memcpy(at, &be, 8);
}

/* The index of the run of r holding offset (r's runs cover [0, r->length)). */
static uint64_t find_run(const struct pyuffd_serve_region *r, uint64_t offset)
{
	uint64_t lo = 0, hi = r->nruns;
	while (hi - lo > 1) {
		uint64_t mid = lo + (hi - lo) / 2;
		if (r->runs[mid].start <= offset)
			lo = mid;
		else
			hi = mid;
	}
	return lo;
}

/* Read n bytes at off whole; 0 on success, -1 on an error or an early end of file. */
static int pread_all(int fd, uint8_t *buf, uint64_t n, uint64_t off)
{
	while (n) {
		ssize_t got = pread(fd, buf, n, (off_t)off);
		if (got < 0 && errno == EINTR)
			continue;
		if (got <= 0)
			return -1;
		buf += got;
		off += (uint64_t)got;
		n -= (uint64_t)got;
	}
	return 0;
}

struct reply {
	uint8_t *data;  /* max_read bytes */
	uint8_t *heads; /* MAX_FRAME_HEAD bytes per frame */
	struct iovec *iov; /* two per frame */
};

/*
 * Build the reply to READ (region, offset, length): 0 with *count iovecs
 * ready, 1 when Python must answer it (a bad request, a run for Python, a
 * failed read: nothing was sent).
 */
static int build_reply(const struct pyuffd_serve_config *cfg, struct reply *rp, uint8_t version,
		       uint32_t rid, uint32_t region, uint64_t offset, uint64_t length,
		       size_t *count, uint64_t *data_bytes, uint64_t *zero_bytes)
{
	uint64_t ps = cfg->page_size;
	if (region >= cfg->nregions)
		return 1;
	const struct pyuffd_serve_region *r = &cfg->regions[region];
	if (offset % ps || length % ps || !length || length > r->length ||
	    offset > r->length - length || !r->nruns)
		return 1;
	uint64_t want = length < cfg->max_read ? length : cfg->max_read;
	uint64_t pos = offset, end = offset + want, i = find_run(r, offset);
	size_t heads = 0, n = 0;
	*data_bytes = *zero_bytes = 0;
	while (pos < end) {
		if (i >= r->nruns)
			return 1;
		const struct pyuffd_serve_run *run = &r->runs[i++];
		uint64_t run_end = run->start + run->length;
		uint64_t piece = (run_end < end ? run_end : end) - pos;
		if (run->kind == PYUFFD_RUN_ZERO) {
			uint8_t *h = rp->heads + heads++ * MAX_FRAME_HEAD;
			put_header(h, version, T_ZERO, rid, 16);
			put_u64(h + HEADER, pos);
			put_u64(h + HEADER + 8, piece);
			rp->iov[n++] = (struct iovec){h, HEADER + 16};
			*zero_bytes += piece;
		} else if (run->kind == PYUFFD_RUN_DATA) {
			uint8_t *at = rp->data + (pos - offset);
			if (pread_all(cfg->file_fd, at, piece, run->file_offset + (pos - run->start)))
				return 1;
			for (uint64_t done_ = 0; done_ < piece; done_ += cfg->frame_bytes) {
				uint64_t k = piece - done_ < cfg->frame_bytes ? piece - done_ : cfg->frame_bytes;
				uint8_t *h = rp->heads + heads++ * MAX_FRAME_HEAD;
				put_header(h, version, T_DATA, rid, (uint32_t)(k + 8));
				put_u64(h + HEADER, pos + done_);
				rp->iov[n++] = (struct iovec){h, HEADER + 8};
				rp->iov[n++] = (struct iovec){at + done_, k};
			}
			*data_bytes += piece;
		} else {
			return 1;
		}
		pos += piece;
	}
	uint8_t *h = rp->heads + heads * MAX_FRAME_HEAD;
	put_header(h, version, T_END, rid, 8);
	put_u64(h + HEADER, want);
	rp->iov[n++] = (struct iovec){h, HEADER + 8};
	*count = n;
	return 0;
}

int pyuffd_serve_faults(const struct pyuffd_serve_config *cfg, int sock,
			struct pyuffd_serve_state *st)
{
	/* The most frames of one reply: a frame per page (runs alternate), the
	 * DATA frames a long run is split into, and END. */
	size_t frames = cfg->max_read / cfg->page_size + cfg->max_read / cfg->frame_bytes + 2;
	struct reply rp = {
		.data = malloc(cfg->max_read),
		.heads = malloc(frames * MAX_FRAME_HEAD),
		.iov = malloc(2 * frames * sizeof(struct iovec)),
	};
	int reason = 0;
	st->requests = st->bytes = st->zero_bytes = 0;
	if (!rp.data || !rp.heads || !rp.iov) {
		reason = done(st, PYUFFD_SERVE_NOMEM, ENOMEM);
		goto out;
	}
	int64_t last = now_ms();
	for (;;) {
		uint8_t frame[HEADER + READ_PAYLOAD];
		reason = recv_frame(cfg, sock, frame, &last, st);
		if (reason)
			break;
		uint32_t rid, region;
		uint64_t offset, length;
		uint16_t flags;
		memcpy(&flags, frame + 4, 2);
		memcpy(&rid, frame + 8, 4);
		memcpy(&region, frame + HEADER, 4);
		memcpy(&offset, frame + HEADER + 4, 8);
		memcpy(&length, frame + HEADER + 12, 8);
		rid = be32toh(rid);
		region = be32toh(region);
		offset = be64toh(offset);
		length = be64toh(length);
		size_t count;
		uint64_t data_bytes, zero_bytes;
		if (build_reply(cfg, &rp, frame[2], rid, region, offset, length, &count, &data_bytes,
				&zero_bytes)) {
			st->request_id = rid;
			st->region = region;
			st->offset = offset;
			st->length = length;
			st->version = frame[2];
			st->urgent = (be16toh(flags) & FLAG_URGENT) != 0;
			reason = done(st, PYUFFD_SERVE_READ, 0);
			break;
		}
		st->requests++;
		reason = send_all(cfg, sock, rp.iov, count, st);
		if (reason)
			break;
		st->bytes += data_bytes;
		st->zero_bytes += zero_bytes;
		last = now_ms();
	}
out:
	free(rp.data);
	free(rp.heads);
	free(rp.iov);
	return reason;
}
