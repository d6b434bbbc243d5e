/*
 * ref_handler: the textbook userfaultfd handler, as a C baseline for the
 * pyuffd benchmark suite.
 *
 * The handler is written the way tools/testing/selftests/mm/uffd-*.c and the
 * userfaultfd(2) example write it: a blocking fd (no O_NONBLOCK), one
 * read() of one struct uffd_msg per fault, one page-sized UFFDIO_COPY per
 * fault from a source buffer.  Nothing is batched, so the figures are what a
 * competent hand-written C handler gets, not the best the kernel can do;
 * `notouch` and `bulkcopy` give the two limits around it.
 *
 * Stopping a blocking reader: closing a userfaultfd does not wake a thread
 * blocked in read() on it, so instead of poll() on a second fd we register
 * one extra "stop page" after the N workload pages.  When the touchers are
 * done, the main thread touches it; the handler zero-fills it, which wakes
 * the main thread, and leaves its loop.  The fault path stays a bare read().
 *
 * Workloads (see usage()): random, sequential, threads, notouch, bulkcopy,
 * pagemap_scan.  Output: one line of JSON on stdout; each figure is a list
 * with one value per repeat, and "median" holds the median of each list.
 * Exit status 1 on any failure, including a content check that fails.
 *
 * Page i of every source holds the byte 1 + i % 251 (never 0, so a page the
 * kernel zero-filled by mistake is caught); uffd/bench/naive_ctypes.py uses
 * the same pattern.
 *
 * Build: gcc -O2 -Wall -Wextra -pthread -o ref_handler ref_handler.c
 * See userfaultfd(2), ioctl_userfaultfd(2) and, for PAGEMAP_SCAN,
 * Documentation/admin-guide/mm/pagemap.rst.
 */
#define _GNU_SOURCE
#include <err.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <linux/fs.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* Added after the 6.1 uAPI that older distributions ship; values from 6.18. */
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif

#ifndef PAGEMAP_SCAN
struct page_region {
	__u64 start;
	__u64 end;
	__u64 categories;
};

struct pm_scan_arg {
	__u64 size;
	__u64 flags;
	__u64 start;
	__u64 end;
	__u64 walk_end;
	__u64 vec;
	__u64 vec_len;
	__u64 max_pages;
	__u64 category_inverted;
	__u64 category_mask;
	__u64 category_anyof_mask;
	__u64 return_mask;
};

#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif
#ifndef PM_SCAN_WP_MATCHING
#define PM_SCAN_WP_MATCHING (1 << 0)
#endif
#ifndef PM_SCAN_CHECK_WPASYNC
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#endif
#ifndef PAGE_IS_WRITTEN
#define PAGE_IS_WRITTEN (1 << 1)
#endif

#define BULK_CHUNK (2UL << 20)
#define SCAN_VEC_LEN 1024
#define HARVEST_WARMUP 3
#define VERIFY_SAMPLES 1024
#define MAX_METRICS 8

struct opts {
	const char *workload;
	size_t pages;
	int threads;
	int handler_cpu;
	int toucher_cpu;
	int repeat;
	uint64_t seed;
	size_t stride;
};

static size_t page_size;

/* pthread_* return the error instead of setting errno; glibc has no errc(). */
#define err_rc(rc, ...)                  \
	do {                             \
		errno = (rc);            \
		err(1, __VA_ARGS__);     \
	} while (0)

/* --- figures --------------------------------------------------------- */

struct metric {
	const char *name;
	double *vals;
};

static struct metric metrics[MAX_METRICS];
static int nmetrics;
static int nrepeat;

static void set_metric(const char *name, int rep, double value)
{
	int i;

	for (i = 0; i < nmetrics; i++)
		if (strcmp(metrics[i].name, name) == 0)
			break;
	if (i == nmetrics) {
		if (nmetrics == MAX_METRICS)
			errx(1, "too many metrics");
		metrics[i].name = name;
		metrics[i].vals = calloc(nrepeat, sizeof(double));
		if (!metrics[i].vals)
			err(1, "calloc");
		nmetrics++;
	}
	metrics[i].vals[rep] = value;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return (x > y) - (x < y);
}

static double median_of(const double *vals, int n)
{
	double *tmp = malloc(n * sizeof(double));
	double m;

	if (!tmp)
		err(1, "malloc");
	memcpy(tmp, vals, n * sizeof(double));
	qsort(tmp, n, sizeof(double), cmp_double);
	m = n % 2 ? tmp[n / 2] : (tmp[n / 2 - 1] + tmp[n / 2]) / 2;
	free(tmp);
	return m;
}

static void print_json(const struct opts *o)
{
	int i, r;

	printf("{\"workload\": \"%s\", \"pages\": %zu, \"threads\": %d, "
	       "\"handler_cpu\": %d, \"toucher_cpu\": %d, \"repeat\": %d, "
	       "\"seed\": %llu, \"page_size\": %zu, \"verified\": true",
	       o->workload, o->pages, o->threads, o->handler_cpu,
	       o->toucher_cpu, o->repeat, (unsigned long long)o->seed,
	       page_size);
	if (strcmp(o->workload, "pagemap_scan") == 0)
		printf(", \"stride\": %zu", o->stride);
	for (i = 0; i < nmetrics; i++) {
		printf(", \"%s\": [", metrics[i].name);
		for (r = 0; r < nrepeat; r++)
			printf("%s%.15g", r ? ", " : "", metrics[i].vals[r]);
		printf("]");
	}
	printf(", \"median\": {");
	for (i = 0; i < nmetrics; i++)
		printf("%s\"%s\": %.15g", i ? ", " : "", metrics[i].name,
		       median_of(metrics[i].vals, nrepeat));
	printf("}}\n");
	fflush(stdout);
}

/* --- helpers --------------------------------------------------------- */

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static unsigned char pattern(size_t i)
{
	return (unsigned char)(1 + i % 251);
}

/* Pin the calling thread; -1 leaves it wherever the scheduler puts it. */
static void pin_self(int cpu)
{
	cpu_set_t set;
	int rc;

	if (cpu < 0)
		return;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	rc = pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
	if (rc)
		err_rc(rc, "pthread_setaffinity_np(CPU %d)", cpu);
}

static uint64_t splitmix64(uint64_t *state)
{
	uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

static void *map_anon(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		err(1, "mmap(%zu bytes)", len);
	/* 4 KiB faults only: a THP first touch would measure something else. */
	if (madvise(p, len, MADV_NOHUGEPAGE))
		err(1, "madvise(MADV_NOHUGEPAGE)");
	return p;
}

static char *make_source(size_t pages)
{
	char *src = map_anon(pages * page_size);
	size_t i;

	for (i = 0; i < pages; i++)
		memset(src + i * page_size, pattern(i), page_size);
	return src;
}

static int uffd_open(uint64_t features)
{
	struct uffdio_api api = { .api = UFFD_API, .features = features };
	int fd = syscall(SYS_userfaultfd, O_CLOEXEC);

	if (fd < 0)
		err(1, "userfaultfd(2) (needs CAP_SYS_PTRACE or "
		       "vm.unprivileged_userfaultfd=1)");
	if (ioctl(fd, UFFDIO_API, &api))
		err(1, "UFFDIO_API(features=%#llx)",
		    (unsigned long long)features);
	return fd;
}

static void uffd_register(int fd, void *addr, size_t len, uint64_t mode)
{
	struct uffdio_register reg = {
		.range = { .start = (uintptr_t)addr, .len = len },
		.mode = mode,
	};

	if (ioctl(fd, UFFDIO_REGISTER, &reg))
		err(1, "UFFDIO_REGISTER(%p, %zu, mode=%#llx)", addr, len,
		    (unsigned long long)mode);
}

/*
 * Check a sample of pages in full: every byte of page i must be
 * pattern(i), or, with first_only, byte 0 must be and the rest zero.
 */
static void verify(const char *base, size_t pages, int first_only,
		   const char *what)
{
	size_t samples = pages < VERIFY_SAMPLES ? pages : VERIFY_SAMPLES;
	size_t k, b;

	for (k = 0; k <= samples; k++) {
		size_t i = k < samples ? k * pages / samples : pages - 1;
		const unsigned char *p =
			(const unsigned char *)base + i * page_size;

		for (b = 0; b < page_size; b++) {
			unsigned char want = (first_only && b) ? 0 : pattern(i);

			if (p[b] != want) {
				fprintf(stderr,
					"ref_handler: %s: page %zu byte %zu is "
					"%#x, want %#x\n",
					what, i, b, p[b], want);
				exit(1);
			}
		}
	}
}

/* --- the textbook handler -------------------------------------------- */

/*
 * This thread's CPU time: unlike the wall clock it leaves out the time other
 * processes had the CPU, so it stays steady on a shared host.
 */
static uint64_t thread_cpu_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

struct handler {
	int uffd;
	int cpu;
	char *base;
	char *stop_page;
	const char *src;
	long faults;
	long eexist;
	uint64_t cpu_ns; /* the handler thread's CPU time over its whole life */
};

static void *handler_main(void *arg)
{
	struct handler *h = arg;

	pin_self(h->cpu);
	for (;;) {
		struct uffd_msg msg;
		struct uffdio_copy copy;
		ssize_t n = read(h->uffd, &msg, sizeof(msg));
		char *page;

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			err(1, "read(userfaultfd)");
		if (n != sizeof(msg))
			errx(1, "read(userfaultfd): %zd bytes", n);
		if (msg.event != UFFD_EVENT_PAGEFAULT)
			errx(1, "unexpected userfaultfd event %#x", msg.event);
		page = (char *)(uintptr_t)(msg.arg.pagefault.address &
					   ~(uint64_t)(page_size - 1));
		if (page == h->stop_page) {
			struct uffdio_zeropage zp = {
				.range = { .start = (uintptr_t)page,
					   .len = page_size },
			};

			if (ioctl(h->uffd, UFFDIO_ZEROPAGE, &zp))
				err(1, "UFFDIO_ZEROPAGE(stop page)");
			h->cpu_ns = thread_cpu_ns();
			return NULL;
		}
		copy = (struct uffdio_copy){
			.dst = (uintptr_t)page,
			.src = (uintptr_t)(h->src + (page - h->base)),
			.len = page_size,
		};
		if (ioctl(h->uffd, UFFDIO_COPY, &copy)) {
			struct uffdio_range range = { (uintptr_t)page,
						      page_size };

			if (errno != EEXIST)
				err(1, "UFFDIO_COPY(%p)", page);
			/*
			 * A second message for a page already filled (the
			 * faulting thread retried): the copy woke nobody, so
			 * wake the range explicitly.
			 */
			if (ioctl(h->uffd, UFFDIO_WAKE, &range))
				err(1, "UFFDIO_WAKE(%p)", page);
			h->eexist++;
		}
		h->faults++;
	}
}

/* --- touchers -------------------------------------------------------- */

struct toucher {
	pthread_t tid;
	pthread_barrier_t *start;
	int cpu;
	char *base;
	size_t first, count;
	const uint32_t *order; /* NULL: pages first..first+count in order */
	uint64_t *fault_ns;    /* NULL: no per-fault timing */
	uint64_t sink;
};

static void *toucher_main(void *arg)
{
	struct toucher *t = arg;
	uint64_t sink = 0;
	size_t i;

	pin_self(t->cpu);
	pthread_barrier_wait(t->start);
	for (i = 0; i < t->count; i++) {
		size_t idx = t->order ? t->order[i] : t->first + i;
		volatile const char *p = t->base + idx * page_size;

		if (t->fault_ns) {
			uint64_t t0 = now_ns();

			sink += *p;
			t->fault_ns[i] = now_ns() - t0;
		} else {
			sink += *p;
		}
	}
	t->sink = sink;
	return NULL;
}

/*
 * One run of random, sequential or threads: fresh memory and a fresh
 * userfaultfd, the handler thread, then the touchers.
 */
static void run_uffd_touch(const struct opts *o, const char *src, int rep)
{
	int shuffled = strcmp(o->workload, "random") == 0;
	int nthreads = strcmp(o->workload, "threads") == 0 ? o->threads : 1;
	size_t len = (o->pages + 1) * page_size;
	char *base = map_anon(len);
	struct handler h = {
		.uffd = uffd_open(0),
		.cpu = o->handler_cpu,
		.base = base,
		.stop_page = base + o->pages * page_size,
		.src = src,
	};
	struct toucher *ts = calloc(nthreads, sizeof(*ts));
	uint32_t *order = NULL;
	uint64_t *fault_ns = NULL;
	pthread_barrier_t start;
	pthread_t handler;
	uint64_t t0, elapsed;
	int i, rc;

	if (!ts)
		err(1, "calloc");
	uffd_register(h.uffd, base, len, UFFDIO_REGISTER_MODE_MISSING);
	if (shuffled) {
		uint64_t state = o->seed + rep;
		size_t k;

		order = malloc(o->pages * sizeof(*order));
		fault_ns = malloc(o->pages * sizeof(*fault_ns));
		if (!order || !fault_ns)
			err(1, "malloc");
		for (k = 0; k < o->pages; k++)
			order[k] = k;
		for (k = o->pages - 1; k > 0; k--) {
			size_t j = splitmix64(&state) % (k + 1);
			uint32_t tmp = order[k];

			order[k] = order[j];
			order[j] = tmp;
		}
	}
	rc = pthread_create(&handler, NULL, handler_main, &h);
	if (rc)
		err_rc(rc, "pthread_create(handler)");
	pthread_barrier_init(&start, NULL, nthreads + 1);
	for (i = 0; i < nthreads; i++) {
		ts[i] = (struct toucher){
			.start = &start,
			.cpu = o->toucher_cpu,
			.base = base,
			.first = o->pages * i / nthreads,
			.count = o->pages * (i + 1) / nthreads -
				 o->pages * i / nthreads,
			.order = order,
			.fault_ns = fault_ns,
		};
		rc = pthread_create(&ts[i].tid, NULL, toucher_main, &ts[i]);
		if (rc)
			err_rc(rc, "pthread_create(toucher)");
	}
	pthread_barrier_wait(&start);
	t0 = now_ns();
	for (i = 0; i < nthreads; i++)
		pthread_join(ts[i].tid, NULL);
	elapsed = now_ns() - t0;
	(void)*(volatile char *)h.stop_page;
	pthread_join(handler, NULL);
	pthread_barrier_destroy(&start);

	verify(base, o->pages, 0, o->workload);
	set_metric("pages_per_s", rep, o->pages * 1e9 / elapsed);
	set_metric("elapsed_ns", rep, elapsed);
	set_metric("faults", rep, h.faults);
	set_metric("handler_cpu_ns", rep, h.cpu_ns);
	set_metric("cpu_us_per_fault", rep, h.cpu_ns / 1e3 / h.faults);
	if (shuffled) {
		double sum = 0;
		size_t k;

		for (k = 0; k < o->pages; k++)
			sum += fault_ns[k];
		qsort(fault_ns, o->pages, sizeof(*fault_ns), cmp_u64);
		set_metric("fault_ns_median", rep,
			   o->pages % 2 ? fault_ns[o->pages / 2]
					: (fault_ns[o->pages / 2 - 1] +
					   fault_ns[o->pages / 2]) / 2.0);
		set_metric("fault_ns_p90", rep,
			   fault_ns[(o->pages * 9 - 1) / 10]);
		set_metric("fault_ns_mean", rep, sum / o->pages);
	}
	close(h.uffd);
	munmap(base, len);
	free(order);
	free(fault_ns);
	free(ts);
}

/* Limit 1: the same first touch with no userfaultfd at all. */
static void run_notouch(const struct opts *o, int rep)
{
	size_t len = o->pages * page_size;
	char *base = map_anon(len);
	uint64_t t0, elapsed;
	size_t i;

	/*
	 * A write, so each fault allocates and fills a page as UFFDIO_COPY
	 * does; a read would only map the shared zero page.
	 */
	t0 = now_ns();
	for (i = 0; i < o->pages; i++)
		*(volatile char *)(base + i * page_size) = pattern(i);
	elapsed = now_ns() - t0;
	verify(base, o->pages, 1, "notouch");
	set_metric("pages_per_s", rep, o->pages * 1e9 / elapsed);
	set_metric("elapsed_ns", rep, elapsed);
	munmap(base, len);
}

/* Limit 2: fill the whole range with UFFDIO_COPY in 2 MiB calls. */
static void run_bulkcopy(const struct opts *o, const char *src, int rep)
{
	size_t len = o->pages * page_size;
	char *base = map_anon(len);
	int fd = uffd_open(0);
	uint64_t t0, elapsed;
	size_t done = 0;
	long calls = 0;

	uffd_register(fd, base, len, UFFDIO_REGISTER_MODE_MISSING);
	t0 = now_ns();
	while (done < len) {
		size_t chunk = len - done < BULK_CHUNK ? len - done : BULK_CHUNK;
		struct uffdio_copy copy = {
			.dst = (uintptr_t)(base + done),
			.src = (uintptr_t)(src + done),
			.len = chunk,
		};

		calls++;
		if (ioctl(fd, UFFDIO_COPY, &copy) == 0) {
			done += chunk;
			continue;
		}
		/* EAGAIN: partial copy while the mm changed; resume after it. */
		if (errno != EAGAIN || copy.copy <= 0)
			err(1, "UFFDIO_COPY(%zu bytes at offset %zu)", chunk,
			    done);
		done += copy.copy;
	}
	elapsed = now_ns() - t0;
	verify(base, o->pages, 0, "bulkcopy");
	set_metric("pages_per_s", rep, o->pages * 1e9 / elapsed);
	set_metric("elapsed_ns", rep, elapsed);
	set_metric("ioctl_calls", rep, calls);
	close(fd);
	munmap(base, len);
}

/*
 * One PAGEMAP_SCAN sweep over [base, base+len): returns the pages found
 * and stores the ranges and ioctl calls.  With wp, written pages are
 * write-protected again as they are reported (the harvest).  With a stride
 * above 1 each range must be the next stride-th page; the check is a
 * comparison, no division, so it costs the loop next to nothing.
 */
static size_t pagemap_sweep(int pagemap, char *base, size_t len, int wp,
			    size_t stride, size_t *nranges, long *calls)
{
	static struct page_region vec[SCAN_VEC_LEN];
	struct pm_scan_arg arg = {
		.size = sizeof(arg),
		.flags = PM_SCAN_CHECK_WPASYNC | (wp ? PM_SCAN_WP_MATCHING : 0),
		.start = (uintptr_t)base,
		.end = (uintptr_t)base + len,
		.vec = (uintptr_t)vec,
		.vec_len = SCAN_VEC_LEN,
		.category_mask = PAGE_IS_WRITTEN,
		.return_mask = PAGE_IS_WRITTEN,
	};
	uint64_t next = (uintptr_t)base, step = stride * page_size;
	uint64_t bytes = 0;

	*nranges = 0;
	*calls = 0;
	for (;;) {
		int n = ioctl(pagemap, PAGEMAP_SCAN, &arg);
		int i;

		if (n < 0)
			err(1, "ioctl(PAGEMAP_SCAN)");
		++*calls;
		for (i = 0; i < n; i++) {
			if (stride > 1 && (vec[i].start != next ||
					   vec[i].end != next + page_size))
				errx(1, "PAGEMAP_SCAN reported page %zu as "
					"written; only every %zu-th was",
				     (size_t)(vec[i].start - (uintptr_t)base) /
					     page_size,
				     stride);
			next += step;
			bytes += vec[i].end - vec[i].start;
		}
		*nranges += n;
		if (arg.walk_end >= arg.end)
			return bytes / page_size;
		arg.start = arg.walk_end;
	}
}

/*
 * Dirty tracking: write every stride-th page, time one harvest; the first
 * HARVEST_WARMUP rounds are not timed (uffd/bench/workloads.py run_dirty
 * warms up as many: a harvest that stores its result settles its memory).
 */
static void run_pagemap_scan(const struct opts *o)
{
	size_t len = o->pages * page_size;
	size_t want = (o->pages + o->stride - 1) / o->stride;
	char *base = map_anon(len);
	int fd = uffd_open(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED);
	int pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	struct uffdio_writeprotect wp = {
		.range = { .start = (uintptr_t)base, .len = len },
		.mode = UFFDIO_WRITEPROTECT_MODE_WP,
	};
	size_t i, ranges, found;
	long calls;
	int rep;

	if (pagemap < 0)
		err(1, "open(/proc/self/pagemap)");
	uffd_register(fd, base, len, UFFDIO_REGISTER_MODE_WP);
	for (i = 0; i < o->pages; i++)
		base[i * page_size] = pattern(i);
	if (ioctl(fd, UFFDIO_WRITEPROTECT, &wp))
		err(1, "UFFDIO_WRITEPROTECT");
	pin_self(o->handler_cpu);
	for (rep = -HARVEST_WARMUP; rep < o->repeat; rep++) {
		size_t left, left_ranges;
		uint64_t t0, cpu0, elapsed, cpu;
		long left_calls;

		for (i = 0; i < o->pages; i += o->stride)
			base[i * page_size] = pattern(i);
		cpu0 = thread_cpu_ns();
		t0 = now_ns();
		found = pagemap_sweep(pagemap, base, len, 1, o->stride,
				      &ranges, &calls);
		elapsed = now_ns() - t0;
		cpu = thread_cpu_ns() - cpu0;
		if (found != want)
			errx(1, "harvest found %zu written pages, want %zu",
			     found, want);
		if (ranges != (o->stride == 1 ? 1 : want))
			errx(1, "harvest found %zu ranges, want %zu", ranges,
			     o->stride == 1 ? 1 : want);
		/* The harvest re-protected them: nothing is written now. */
		left = pagemap_sweep(pagemap, base, len, 0, 1, &left_ranges,
				     &left_calls);
		if (left)
			errx(1, "%zu pages still written after the harvest",
			     left);
		if (rep < 0)
			continue;
		set_metric("harvest_ns", rep, elapsed);
		set_metric("harvest_cpu_ns", rep, cpu);
		set_metric("ranges", rep, ranges);
		set_metric("pages_found", rep, found);
		set_metric("ioctl_calls", rep, calls);
	}
	verify(base, o->pages, 1, "pagemap_scan");
	close(pagemap);
	close(fd);
	munmap(base, len);
}

/* --- main ------------------------------------------------------------ */

static void usage(void)
{
	fprintf(stderr,
		"usage: ref_handler WORKLOAD --pages N [--threads T] "
		"[--handler-cpu C] [--toucher-cpu C] [--repeat R] [--seed S] "
		"[--stride K]\n"
		"WORKLOAD: random | sequential | threads | notouch | bulkcopy "
		"| pagemap_scan\n");
	exit(2);
}

static long long parse_num(const char *s, const char *what, long long min)
{
	char *end;
	long long v;

	errno = 0;
	v = strtoll(s, &end, 0);
	if (errno || *end || end == s || v < min)
		errx(2, "%s: bad value '%s' (minimum %lld)", what, s, min);
	return v;
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "pages", required_argument, NULL, 'n' },
		{ "threads", required_argument, NULL, 't' },
		{ "handler-cpu", required_argument, NULL, 'H' },
		{ "toucher-cpu", required_argument, NULL, 'T' },
		{ "repeat", required_argument, NULL, 'r' },
		{ "seed", required_argument, NULL, 's' },
		{ "stride", required_argument, NULL, 'k' },
		{ NULL, 0, NULL, 0 },
	};
	struct opts o = { .threads = 1, .handler_cpu = -1, .toucher_cpu = -1,
			  .repeat = 3, .seed = 1, .stride = 4 };
	char *src = NULL;
	int c, rep;

	while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (c) {
		case 'n':
			o.pages = parse_num(optarg, "--pages", 1);
			break;
		case 't':
			o.threads = parse_num(optarg, "--threads", 1);
			break;
		case 'H':
			o.handler_cpu = parse_num(optarg, "--handler-cpu", -1);
			break;
		case 'T':
			o.toucher_cpu = parse_num(optarg, "--toucher-cpu", -1);
			break;
		case 'r':
			o.repeat = parse_num(optarg, "--repeat", 1);
			break;
		case 's':
			o.seed = parse_num(optarg, "--seed", 0);
			break;
		case 'k':
			o.stride = parse_num(optarg, "--stride", 1);
			break;
		default:
			usage();
		}
	}
	if (optind != argc - 1 || o.pages == 0)
		usage();
	o.workload = argv[optind];
	if (o.pages > UINT32_MAX)
		errx(2, "--pages: at most %u", UINT32_MAX);
	page_size = sysconf(_SC_PAGESIZE);
	nrepeat = o.repeat;

	if (!strcmp(o.workload, "random") || !strcmp(o.workload, "sequential") ||
	    !strcmp(o.workload, "threads")) {
		if (strcmp(o.workload, "threads") && o.threads != 1)
			errx(2, "--threads applies to the threads workload");
		src = make_source(o.pages);
		for (rep = 0; rep < o.repeat; rep++)
			run_uffd_touch(&o, src, rep);
	} else if (!strcmp(o.workload, "notouch")) {
		pin_self(o.toucher_cpu);
		for (rep = 0; rep < o.repeat; rep++)
			run_notouch(&o, rep);
	} else if (!strcmp(o.workload, "bulkcopy")) {
		src = make_source(o.pages);
		pin_self(o.handler_cpu);
		for (rep = 0; rep < o.repeat; rep++)
			run_bulkcopy(&o, src, rep);
	} else if (!strcmp(o.workload, "pagemap_scan")) {
		run_pagemap_scan(&o);
	} else {
		usage();
	}
	print_json(&o);
	return 0;
}
