/*
 * Per-page counters for the uffd-stress style load test (tests/test_stress.py).
 *
 * Built by the test into a temporary shared library and called through
 * ctypes, which releases the GIL: the increments run in C on several
 * threads while the FaultHandler's Python dispatch thread serves the faults
 * they take. Locks and the expected counts live in ordinary (unregistered)
 * heap memory; only the counter pages are registered.
 *
 * Counter page layout (64-bit words): [0] = TAG ^ page index, [1] = count,
 * [page/2 words] = count, [last word] = count. Under the page's lock the
 * count must always equal expected[page]: a lost update, a stale or torn
 * page, or another page's data shows up at the next increment of that page.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define TAG 0x72656c5f63747200ull

struct counters {
	size_t npages, page_size;
	pthread_mutex_t *locks;
	uint64_t *expected;
	uint64_t increments;
	uint64_t wrong_page, torn, lost;
};

struct counters *counters_new(size_t npages, size_t page_size)
{
	struct counters *c = calloc(1, sizeof(*c));
	if (!c)
		return NULL;
	c->npages = npages;
	c->page_size = page_size;
	c->locks = calloc(npages, sizeof(*c->locks));
	c->expected = calloc(npages, sizeof(*c->expected));
	if (!c->locks || !c->expected) {
		free(c->locks);
		free(c->expected);
		free(c);
		return NULL;
	}
	for (size_t i = 0; i < npages; i++)
		pthread_mutex_init(&c->locks[i], NULL);
	return c;
}

void counters_free(struct counters *c)
{
	for (size_t i = 0; i < c->npages; i++)
		pthread_mutex_destroy(&c->locks[i]);
	free(c->locks);
	free(c->expected);
	free(c);
}

uint64_t counters_tag(size_t page)
{
	return TAG ^ (uint64_t)page;
}

/* Fill a zeroed source buffer with the initial pages (count 0, tagged). */
void counters_init_pages(struct counters *c, uint64_t base)
{
	for (size_t i = 0; i < c->npages; i++) {
		uint64_t *p = (uint64_t *)(uintptr_t)(base + i * c->page_size);
		memset(p, 0, c->page_size);
		p[0] = counters_tag(i);
	}
}

static void check_page(struct counters *c, size_t page, volatile uint64_t *p)
{
	size_t words = c->page_size / 8;
	if (p[0] != counters_tag(page))
		__atomic_add_fetch(&c->wrong_page, 1, __ATOMIC_RELAXED);
	if (p[1] != p[words / 2] || p[1] != p[words - 1])
		__atomic_add_fetch(&c->torn, 1, __ATOMIC_RELAXED);
	if (p[1] != c->expected[page])
		__atomic_add_fetch(&c->lost, 1, __ATOMIC_RELAXED);
}

/*
 * n increments of random pages of the area at base (seeded: rand_r). Each
 * takes the page's lock, checks the page, bumps the three copies of the
 * count and the expected count. Returns the anomalies seen so far.
 */
uint64_t counters_run(struct counters *c, uint64_t base, uint64_t n, unsigned seed)
{
	size_t words = c->page_size / 8;
	for (uint64_t k = 0; k < n; k++) {
		size_t page = (size_t)rand_r(&seed) % c->npages;
		volatile uint64_t *p = (volatile uint64_t *)(uintptr_t)(base + page * c->page_size);
		pthread_mutex_lock(&c->locks[page]);
		check_page(c, page, p);
		uint64_t v = p[1] + 1;
		p[1] = v;
		p[words / 2] = v;
		p[words - 1] = v;
		c->expected[page]++;
		pthread_mutex_unlock(&c->locks[page]);
	}
	__atomic_add_fetch(&c->increments, n, __ATOMIC_RELAXED);
	return c->wrong_page + c->torn + c->lost;
}

/* Check every page of the area at base (all threads stopped); returns the bad pages. */
uint64_t counters_check(struct counters *c, uint64_t base)
{
	uint64_t before = c->wrong_page + c->torn + c->lost;
	for (size_t i = 0; i < c->npages; i++)
		check_page(c, i, (volatile uint64_t *)(uintptr_t)(base + i * c->page_size));
	return c->wrong_page + c->torn + c->lost - before;
}

uint64_t counters_expected(struct counters *c, size_t page)
{
	return c->expected[page];
}

/* increments, wrong_page, torn, lost */
void counters_stats(struct counters *c, uint64_t out[4])
{
	out[0] = c->increments;
	out[1] = c->wrong_page;
	out[2] = c->torn;
	out[3] = c->lost;
}

/*
 * Read n bytes at addr through the kernel (pwrite into fd at offset 0), so
 * an access to an address that was just moved or unmapped fails with
 * -EFAULT instead of a SIGSEGV. Returns bytes written or -errno.
 */
long kernel_read(int fd, uint64_t addr, size_t n)
{
	ssize_t done = pwrite(fd, (const void *)(uintptr_t)addr, n, 0);
	return done < 0 ? -errno : (long)done;
}
