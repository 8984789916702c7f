"""A full disk on demand: a small preloaded C library fails every write(2) and pwrite(2) to
files whose path contains a pattern with ENOSPC, once a given number of them succeeded (the
disk fills up at that write and stays full). Runs of preprocess_volume.main are forked from a
server that imported torch and TensorStore once, with the library preloaded, each run armed
with its own pattern and count. Used by tests/test_full_disk.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.fault_injection import compile_library

REPO = Path(__file__).resolve().parents[1]

SHIM_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#define MAX_FD 65536
static char pattern[4096];
static atomic_long allowed = -1;  /* matching writes that still succeed; -1: nothing fails */
static atomic_long writes;        /* matching writes attempted */
static atomic_char matching[MAX_FD];

void full_disk_arm(const char *p, long n) {
    strncpy(pattern, p, sizeof pattern - 1); atomic_store(&writes, 0); atomic_store(&allowed, n);
}
long full_disk_writes(void) { return atomic_load(&writes); }

static int opened(int fd, const char *path) {
    if (fd >= 0 && fd < MAX_FD) matching[fd] = pattern[0] && path && strstr(path, pattern) != NULL;
    return fd;
}
static int full(int fd) {
    if (fd < 0 || fd >= MAX_FD || !matching[fd]) return 0;
    atomic_fetch_add(&writes, 1);
    if (atomic_load(&allowed) < 0 || atomic_fetch_sub(&allowed, 1) > 0) return 0;
    atomic_store(&allowed, 0);
    errno = ENOSPC;
    return 1;
}

typedef int (*open_fn)(const char *, int, ...);
typedef int (*openat_fn)(int, const char *, int, ...);
typedef ssize_t (*write_fn)(int, const void *, size_t);
typedef ssize_t (*pwrite_fn)(int, const void *, size_t, off_t);
typedef int (*close_fn)(int);

#define REAL(name, type) static type real_##name; if (!real_##name) real_##name = (type)dlsym(RTLD_NEXT, #name)
#define OPEN(name) \
    int name(const char *path, int flags, ...) { \
        REAL(name, open_fn); va_list ap; va_start(ap, flags); \
        mode_t mode = va_arg(ap, mode_t); va_end(ap); return opened(real_##name(path, flags, mode), path); }
#define OPENAT(name) \
    int name(int dir, const char *path, int flags, ...) { \
        REAL(name, openat_fn); va_list ap; va_start(ap, flags); \
        mode_t mode = va_arg(ap, mode_t); va_end(ap); return opened(real_##name(dir, path, flags, mode), path); }
OPEN(open) OPEN(open64) OPENAT(openat) OPENAT(openat64)

ssize_t write(int fd, const void *b, size_t n) { REAL(write, write_fn); return full(fd) ? -1 : real_write(fd, b, n); }
ssize_t pwrite(int fd, const void *b, size_t n, off_t o) {
    REAL(pwrite, pwrite_fn); return full(fd) ? -1 : real_pwrite(fd, b, n, o); }
ssize_t pwrite64(int fd, const void *b, size_t n, off_t o) {
    REAL(pwrite64, pwrite_fn); return full(fd) ? -1 : real_pwrite64(fd, b, n, o); }
int close(int fd) { REAL(close, close_fn); if (fd >= 0 && fd < MAX_FD) matching[fd] = 0; return real_close(fd); }
"""


@dataclass
class Run:
    returncode: int
    writes: int  # matching writes attempted
    stdout: str
    stderr: str


def build_shim(directory: Path) -> Path | None:
    """The library, or None without a C compiler."""
    return compile_library(SHIM_SOURCE, directory, "full_disk")


class FullDiskServer:
    """Forks runs of preprocess_volume.main with the library preloaded."""

    def __init__(self, work: Path, library: Path):
        self.work, self.serial = work, 0
        # PYTHONPATH: the checkout's scripts, whether or not the project is installed
        env = {**os.environ, "LD_PRELOAD": str(library), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).resolve())], cwd=REPO, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the full-disk server did not start")

    def run(self, args: list[str], pattern: str = "", allowed: int = -1) -> Run:
        """preprocess_volume with `args`: writes to paths containing `pattern` fail from the
        (allowed+1)-th on (allowed -1: none fails, the writes are only counted)."""
        self.serial += 1
        log = self.work / f"run{self.serial}"
        self.process.stdin.write(json.dumps(dict(args=[str(a) for a in args], pattern=pattern, allowed=allowed,
                                                 log=str(log))) + "\n")
        self.process.stdin.flush()
        code, writes = json.loads(self.process.stdout.readline())
        out, err = (log.with_suffix(s) for s in (".out", ".err"))
        return Run(code, writes, out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def serve() -> None:
    import ctypes

    import tensorstore  # noqa: F401 - imported once, before any fork
    import torch  # noqa: F401

    import preprocess_volume

    shim = ctypes.CDLL(None)
    shim.full_disk_writes.restype = ctypes.c_long
    print("ready", flush=True)
    for line in sys.stdin:
        run = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                log = Path(run["log"])
                for fd, suffix in ((1, ".out"), (2, ".err")):
                    os.dup2(os.open(log.with_suffix(suffix), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
                shim.full_disk_arm(run["pattern"].encode(), ctypes.c_long(run["allowed"]))
                code = preprocess_volume.main(run["args"])
            except BaseException:  # noqa: BLE001 - a traceback in the run's stderr: the test sees it
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                Path(run["log"]).with_suffix(".writes").write_text(str(shim.full_disk_writes()))
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        writes_file = Path(run["log"]).with_suffix(".writes")
        writes = int(writes_file.read_text()) if writes_file.exists() else -1
        print(json.dumps([os.waitstatus_to_exitcode(status), writes]), flush=True)


if __name__ == "__main__":
    serve()
