/*
 * libtouch: the toucher side of uffd/bench/naive_ctypes.py.
 *
 * A Python thread that touched the registered memory itself would fault
 * while holding the GIL, and the Python handler thread, which needs the GIL
 * to resolve that fault, could never run.  ctypes.CDLL releases the GIL
 * around every call, so the touch loops live here.  The loops and timing
 * are the same as the touchers in ref_handler.c.
 *
 * Both functions return 0 or -errno and store the wall time of the loop in
 * *elapsed_ns.
 *
 * Build: gcc -O2 -Wall -Wextra -pthread -shared -fPIC -o libtouch.so touch.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

int touch_pages(char *base, size_t npages, size_t page_size,
		const uint64_t *order, uint64_t *fault_ns, int cpu,
		uint64_t *elapsed_ns);
int touch_range(char *base, size_t npages, size_t page_size, int nthreads,
		int cpu, uint64_t *elapsed_ns);

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static int pin_self(int cpu)
{
	cpu_set_t set;

	if (cpu < 0)
		return 0;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	return -pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

/*
 * Read one byte of each page, in the order given (NULL: in address order),
 * on the calling thread.  With fault_ns, time each access into
 * fault_ns[i].  With cpu >= 0 the thread runs pinned to that CPU and gets
 * its previous affinity back on return, since the caller is a Python
 * thread that outlives the call.
 */
int touch_pages(char *base, size_t npages, size_t page_size,
		const uint64_t *order, uint64_t *fault_ns, int cpu,
		uint64_t *elapsed_ns)
{
	volatile char sink = 0;
	cpu_set_t saved;
	uint64_t t0;
	size_t i;
	int rc;

	if (cpu >= 0) {
		rc = pthread_getaffinity_np(pthread_self(), sizeof(saved),
					    &saved);
		if (rc)
			return -rc;
		rc = pin_self(cpu);
		if (rc)
			return rc;
	}
	t0 = now_ns();
	for (i = 0; i < npages; i++) {
		volatile const char *p =
			base + (order ? order[i] : i) * page_size;

		if (fault_ns) {
			uint64_t f0 = now_ns();

			sink += *p;
			fault_ns[i] = now_ns() - f0;
		} else {
			sink += *p;
		}
	}
	*elapsed_ns = now_ns() - t0;
	(void)sink;
	if (cpu >= 0)
		return -pthread_setaffinity_np(pthread_self(), sizeof(saved),
					       &saved);
	return 0;
}

/* Start line for touch_range: every thread pinned and waiting before t0. */
struct gate {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	int ready;
	int go; /* 0: wait, 1: touch, -1: give up (a thread failed to start) */
};

struct slice {
	pthread_t tid;
	struct gate *gate;
	char *base;
	size_t npages, page_size;
	int cpu;
	int rc;
};

static void *slice_main(void *arg)
{
	struct slice *s = arg;
	struct gate *g = s->gate;
	volatile char sink = 0;
	size_t i;
	int go;

	s->rc = pin_self(s->cpu);
	pthread_mutex_lock(&g->lock);
	g->ready++;
	pthread_cond_broadcast(&g->cond);
	while (!g->go)
		pthread_cond_wait(&g->cond, &g->lock);
	go = g->go;
	pthread_mutex_unlock(&g->lock);
	if (go < 0 || s->rc)
		return NULL;
	for (i = 0; i < s->npages; i++)
		sink += *(volatile const char *)(s->base + i * s->page_size);
	(void)sink;
	return NULL;
}

/*
 * Read one byte of each page from nthreads new threads, each on its own
 * contiguous slice, all pinned to cpu when cpu >= 0; time from the common
 * start to the last join.
 */
int touch_range(char *base, size_t npages, size_t page_size, int nthreads,
		int cpu, uint64_t *elapsed_ns)
{
	struct gate g = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
			  0, 0 };
	struct slice *s;
	int i, rc = 0, started = 0;
	uint64_t t0;

	if (nthreads < 1)
		return -EINVAL;
	s = calloc(nthreads, sizeof(*s));
	if (!s)
		return -ENOMEM;
	for (i = 0; i < nthreads; i++) {
		size_t first = npages * i / nthreads;

		s[i] = (struct slice){
			.gate = &g,
			.base = base + first * page_size,
			.npages = npages * (i + 1) / nthreads - first,
			.page_size = page_size,
			.cpu = cpu,
		};
		rc = -pthread_create(&s[i].tid, NULL, slice_main, &s[i]);
		if (rc)
			break;
		started++;
	}
	pthread_mutex_lock(&g.lock);
	while (g.ready < started)
		pthread_cond_wait(&g.cond, &g.lock);
	g.go = rc ? -1 : 1;
	pthread_cond_broadcast(&g.cond);
	pthread_mutex_unlock(&g.lock);
	t0 = now_ns();
	for (i = 0; i < started; i++)
		pthread_join(s[i].tid, NULL);
	*elapsed_ns = now_ns() - t0;
	for (i = 0; i < started && !rc; i++)
		rc = s[i].rc;
	free(s);
	return rc;
}
