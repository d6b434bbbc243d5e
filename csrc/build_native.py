"""cffi build script for ``uffd._native`` (API mode, out of line).

Run by setuptools through ``cffi_modules`` in setup.py; it never imports the
package it builds. Every constant is taken from the C headers (``...``), so
no kernel number is typed twice.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

CONSTANTS = """
    UFFD_API UFFD_USER_MODE_ONLY USERFAULTFD_IOC_NEW
    UFFD_FEATURE_PAGEFAULT_FLAG_WP UFFD_FEATURE_EVENT_FORK UFFD_FEATURE_EVENT_REMAP
    UFFD_FEATURE_EVENT_REMOVE UFFD_FEATURE_MISSING_HUGETLBFS UFFD_FEATURE_MISSING_SHMEM
    UFFD_FEATURE_EVENT_UNMAP UFFD_FEATURE_SIGBUS UFFD_FEATURE_THREAD_ID
    UFFD_FEATURE_MINOR_HUGETLBFS UFFD_FEATURE_MINOR_SHMEM UFFD_FEATURE_EXACT_ADDRESS
    UFFD_FEATURE_WP_HUGETLBFS_SHMEM UFFD_FEATURE_WP_UNPOPULATED UFFD_FEATURE_POISON
    UFFD_FEATURE_WP_ASYNC UFFD_FEATURE_MOVE
    UFFDIO_REGISTER_MODE_MISSING UFFDIO_REGISTER_MODE_WP UFFDIO_REGISTER_MODE_MINOR
    _UFFDIO_REGISTER _UFFDIO_UNREGISTER _UFFDIO_WAKE _UFFDIO_COPY _UFFDIO_ZEROPAGE
    _UFFDIO_MOVE _UFFDIO_WRITEPROTECT _UFFDIO_CONTINUE _UFFDIO_POISON _UFFDIO_API
    UFFDIO_API UFFDIO_REGISTER UFFDIO_UNREGISTER UFFDIO_WAKE UFFDIO_COPY UFFDIO_ZEROPAGE
    UFFDIO_MOVE UFFDIO_WRITEPROTECT UFFDIO_CONTINUE UFFDIO_POISON PAGEMAP_SCAN
    UFFD_EVENT_PAGEFAULT UFFD_EVENT_FORK UFFD_EVENT_REMAP UFFD_EVENT_REMOVE UFFD_EVENT_UNMAP
    UFFD_PAGEFAULT_FLAG_WRITE UFFD_PAGEFAULT_FLAG_WP UFFD_PAGEFAULT_FLAG_MINOR
    UFFDIO_COPY_MODE_DONTWAKE UFFDIO_COPY_MODE_WP UFFDIO_ZEROPAGE_MODE_DONTWAKE
    UFFDIO_CONTINUE_MODE_DONTWAKE UFFDIO_CONTINUE_MODE_WP UFFDIO_POISON_MODE_DONTWAKE
    UFFDIO_MOVE_MODE_DONTWAKE UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES
    UFFDIO_WRITEPROTECT_MODE_WP UFFDIO_WRITEPROTECT_MODE_DONTWAKE
    PAGE_IS_WPALLOWED PAGE_IS_WRITTEN PAGE_IS_FILE PAGE_IS_PRESENT PAGE_IS_SWAPPED
    PAGE_IS_PFNZERO PAGE_IS_HUGE PAGE_IS_SOFT_DIRTY PM_SCAN_WP_MATCHING PM_SCAN_CHECK_WPASYNC
    PROT_NONE PROT_READ PROT_WRITE MAP_PRIVATE MAP_SHARED MAP_ANONYMOUS MAP_FIXED
    MAP_NORESERVE MREMAP_MAYMOVE MREMAP_FIXED MREMAP_DONTUNMAP
    MADV_DONTNEED MADV_REMOVE MADV_HUGEPAGE MADV_NOHUGEPAGE
"""


def _declarations(header: str) -> str:
    """The part of one of our headers after its includes, for cdef.

    ``#define NAME value`` lines become ``#define NAME ...`` so the value is
    taken from C, never typed twice.
    """
    body = (HERE / header).read_text().split('#include "uffd_uapi.h"', 1)[1].rsplit("#endif", 1)[0]
    lines = []
    for line in body.splitlines():
        if line.startswith("#define "):
            line = f"#define {line.split()[1]} ..."
        lines.append(line)
    return "\n".join(lines)


CDEF = (
    "".join(f"#define {name} ...\n" for name in CONSTANTS.split())
    + """
struct uffd_msg {
    uint8_t event;
    union {
        struct { uint64_t flags; uint64_t address; union { uint32_t ptid; } feat; } pagefault;
        struct { uint32_t ufd; } fork;
        struct { uint64_t from; uint64_t to; uint64_t len; } remap;
        struct { uint64_t start; uint64_t end; } remove;
        struct { uint64_t reserved1; uint64_t reserved2; uint64_t reserved3; } reserved;
    } arg;
    ...;
};
struct pm_scan_arg {
    uint64_t size; uint64_t flags; uint64_t start; uint64_t end; uint64_t walk_end;
    uint64_t vec; uint64_t vec_len; uint64_t max_pages; uint64_t category_inverted;
    uint64_t category_mask; uint64_t category_anyof_mask; uint64_t return_mask;
};
struct page_region { uint64_t start; uint64_t end; uint64_t categories; };

void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);
void *mremap(void *old_address, size_t old_size, size_t new_size, int flags, ...);
int madvise(void *addr, size_t length, int advice);
"""
    + "".join(
        _declarations(name)
        for name in ("uffd_native.h", "uffd_pump.h", "uffd_install.h", "uffd_serve.h")
    )
)

SOURCES = sorted(str(p.relative_to(HERE.parent)) for p in HERE.glob("uffd_*.c"))


def builder(sources: list[str]) -> FFI:
    """The FFI for ``uffd._native`` built from ``sources`` (setuptools wants them relative)."""
    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source(
        "uffd._native",
        '#include <sys/mman.h>\n#include "uffd_native.h"\n#include "uffd_pump.h"\n'
        '#include "uffd_install.h"\n#include "uffd_serve.h"\n',
        sources=sources,
        include_dirs=[str(HERE)],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11", "-pthread"],
        extra_link_args=["-pthread"],
    )
    return ffi


ffibuilder = builder(SOURCES)

if __name__ == "__main__":
    # ``python csrc/build_native.py [DIR]`` builds into DIR (default: here), e.g.
    # the sanitizer build of `make sanitize`; CFLAGS and LDFLAGS from the
    # environment are added to the flags above. cffi compiles inside DIR, so
    # the sources are given by absolute path.
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else "."
    builder([str(HERE.parent / s) for s in SOURCES]).compile(tmpdir=out, verbose=True)
