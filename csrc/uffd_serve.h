/*
 * The page server's fault channel: a connection that carries only READs, one
 * at a time (protocol version 3, LIST flag FAULTS), served in C by a thread
 * of its own with the GIL released (see uffd/pagestore/_faults.py).
 *
 * pyuffd_serve_faults() loops: receive one 36-byte READ frame (poll-bounded by
 * the idle and frame timeouts), pread its pages from the snapshot's file at
 * the offsets of a run table built by Python, and send DATA/ZERO frames and
 * END in one writev (each wait for room bounded by the send timeout), until
 * something it does not serve itself comes: it then returns, saying why, and
 * Python answers (an ERROR with the same code and message as the asyncio
 * path, or a READ served from Python) and calls it again or closes.
 */
#ifndef PYUFFD_SERVE_H
#define PYUFFD_SERVE_H

#include <stdint.h>

#include "uffd_uapi.h"

/* Why pyuffd_serve_faults returned (pyuffd_serve_state.reason). */
#define PYUFFD_SERVE_EOF 1     /* the peer closed, or the server shut the socket down */
#define PYUFFD_SERVE_IO 2      /* a socket call failed: errno in err */
#define PYUFFD_SERVE_IDLE 3    /* nothing received or sent for idle_ms */
#define PYUFFD_SERVE_PARTIAL 4 /* a started frame was not complete within frame_ms */
#define PYUFFD_SERVE_STALLED 5 /* a reply waited send_ms for room in the socket */
#define PYUFFD_SERVE_HEADER 6  /* a header that is not a well-formed READ: in header */
#define PYUFFD_SERVE_READ 7    /* a READ this loop leaves to Python: its fields */
#define PYUFFD_SERVE_NOMEM 8   /* no memory for the reply buffers */

/* What a run of a region is. */
#define PYUFFD_RUN_DATA 0   /* the bytes are in the file at file_offset */
#define PYUFFD_RUN_ZERO 1   /* all zeros: sent as a ZERO frame */
#define PYUFFD_RUN_PYTHON 2 /* ask Python (a chunk that failed its checksum) */

struct pyuffd_serve_run {
	uint64_t start;       /* offset in the region */
	uint64_t length;      /* bytes, whole pages */
	uint64_t file_offset; /* of start, for PYUFFD_RUN_DATA */
	uint32_t kind;        /* PYUFFD_RUN_* */
	uint32_t reserved;
};

/* A region: runs sorted by start, covering [0, length) without gaps. */
struct pyuffd_serve_region {
	uint64_t length;
	const struct pyuffd_serve_run *runs;
	uint64_t nruns;
};

struct pyuffd_serve_config {
	int32_t file_fd;      /* read with pread only: shared by every channel */
	uint32_t page_size;
	uint64_t max_read;    /* most bytes served per READ (whole pages) */
	uint64_t frame_bytes; /* most page bytes per DATA frame (whole pages) */
	uint32_t versions;    /* bit v set: header version v is spoken */
	int32_t idle_ms;      /* nothing received nor sent this long: PYUFFD_SERVE_IDLE */
	int32_t frame_ms;     /* a started frame must be complete within this */
	int32_t send_ms;      /* each wait for room in the socket */
	const struct pyuffd_serve_region *regions;
	uint32_t nregions;
};

/* Out: why the loop returned and what it served; in: nothing. */
struct pyuffd_serve_state {
	int32_t reason;
	int32_t err;
	uint8_t header[16];  /* PYUFFD_SERVE_HEADER: the header as received */
	uint32_t request_id; /* PYUFFD_SERVE_READ: the READ */
	uint32_t region;
	uint64_t offset;
	uint64_t length;
	uint32_t version;
	uint32_t urgent;
	uint64_t requests;   /* READs served by this call */
	uint64_t bytes;      /* page bytes sent in DATA frames */
	uint64_t zero_bytes; /* bytes sent as ZERO ranges */
};

int pyuffd_serve_faults(const struct pyuffd_serve_config *cfg, int sock,
			struct pyuffd_serve_state *st);

#endif
