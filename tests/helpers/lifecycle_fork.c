/*
 * fork() from C for tests/test_lifecycle.py: called through ctypes, so the GIL
 * is released while glibc's fork() runs (and holds the malloc locks) and the
 * kernel waits for the FORK event to be read. A child of a threaded Python
 * process may only run C and _exit, so each child's work is here too.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PM_UFFD_WP (1ull << 57)

/* fork(); the child exits at once. The child's pid, or -errno. */
int fork_exit(void)
{
	pid_t pid = fork();
	if (pid == 0)
		_exit(0);
	return pid < 0 ? -errno : pid;
}

/* The child's exit status: 1 if the page at addr is uffd-wp in its own pagemap, 0 if not. */
static int child_wp_bit(uint64_t addr)
{
	uint64_t entry = 0;
	int fd = open("/proc/self/pagemap", O_RDONLY);
	long ps = sysconf(_SC_PAGESIZE);
	if (fd < 0 || pread(fd, &entry, sizeof(entry), (off_t)(addr / (uint64_t)ps * 8)) != 8)
		return 2;
	return (entry & PM_UFFD_WP) ? 1 : 0;
}

/* fork(); the child exits with child_wp_bit(addr). The child's pid, or -errno. */
int fork_check_wp(uint64_t addr)
{
	pid_t pid = fork();
	if (pid == 0)
		_exit(child_wp_bit(addr));
	return pid < 0 ? -errno : pid;
}

/*
 * The non-cooperative scenario of the kernel's events test, in the child:
 * read the first half of the pages (each must start with its index + 1, the
 * monitor's copy), write each value back (a WP fault when they are installed
 * write-protected), mremap the area to `to`, do the same for the rest, drop
 * every page with MADV_DONTNEED and check that they now read as zeros.
 * Exit status 0, or the step that failed.
 */
static int events_child(char *area, char *to, uint64_t npages, uint64_t ps)
{
	uint64_t half = (npages + 1) / 2;
	for (uint64_t i = 0; i < npages; i++) {
		if (i == half) {
			area = mremap(area, npages * ps, npages * ps, MREMAP_MAYMOVE | MREMAP_FIXED, to);
			if (area == MAP_FAILED)
				return 10;
		}
		volatile uint64_t *word = (volatile uint64_t *)(area + i * ps);
		uint64_t value = *word;
		if (value != i + 1)
			return 11;
		*word = value;
	}
	if (madvise(area, npages * ps, MADV_DONTNEED))
		return 12;
	for (uint64_t i = 0; i < npages * ps; i++)
		if (area[i])
			return 13;
	return 0;
}

/* fork(); the child runs events_child. The child's pid, or -errno. */
int fork_events(uint64_t area, uint64_t to, uint64_t npages, uint64_t ps)
{
	pid_t pid = fork();
	if (pid == 0)
		_exit(events_child((char *)(uintptr_t)area, (char *)(uintptr_t)to, npages, ps));
	return pid < 0 ? -errno : pid;
}
