"""Kill a run of one of the project's scripts at its k-th rename, unlink or directory removal.

A small preloaded C library wraps rename, renameat, renameat2, unlink, unlinkat, rmdir and
remove: it counts every call of the process (all threads, TensorStore's included) and, once
armed with (k, signal), sends the signal to its own process at the k-th call, before the
call is made. With SIGKILL the call never happens: the run dies exactly there.

Runs are forked from a server that imported torch, transformers and TensorStore once, so a
trial costs the run itself, not an interpreter start-up (the server starts no threads of
its own before it forks). Each run is a real process with its own pid, killed by a real signal.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SHIM_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdatomic.h>
#include <unistd.h>

static atomic_long calls;
static atomic_long target;  /* 0: count only */
static atomic_int sig = SIGKILL;

void fault_arm(long k, int signal_number) { atomic_store(&calls, 0); atomic_store(&sig, signal_number); atomic_store(&target, k); }
long fault_calls(void) { return atomic_load(&calls); }

static void count(void) {
    long n = atomic_fetch_add(&calls, 1) + 1;
    if (n == atomic_load(&target)) {
        int s = atomic_load(&sig);
        kill(getpid(), s);
        if (s == SIGKILL) for (;;) pause();
    }
}

#define WRAP(name, params, args) \
    int name params { static int (*real) params; if (!real) real = dlsym(RTLD_NEXT, #name); count(); return real args; }
WRAP(rename, (const char *a, const char *b), (a, b))
WRAP(renameat, (int d1, const char *a, int d2, const char *b), (d1, a, d2, b))
WRAP(renameat2, (int d1, const char *a, int d2, const char *b, unsigned f), (d1, a, d2, b, f))
WRAP(unlink, (const char *a), (a))
WRAP(unlinkat, (int d, const char *a, int f), (d, a, f))
WRAP(rmdir, (const char *a), (a))
WRAP(remove, (const char *a), (a))
"""

SCRIPTS = ("preprocess_volume", "check_preprocessing")


class FaultInjectionUnavailable(RuntimeError):
    """No C compiler to build the preloaded library."""


@dataclass
class RunResult:
    returncode: int  # negative: killed by that signal
    calls: int | None  # rename/unlink/rmdir calls made, when the run finished by itself
    stdout: str
    stderr: str

    @property
    def killed(self) -> bool:
        return self.returncode < 0


def compile_library(source_text: str, directory: Path, name: str) -> Path | None:
    """A C source compiled as a shared library to preload (LD_PRELOAD), or None without a compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source, library = directory / f"{name}.c", directory / f"{name}.so"
    source.write_text(source_text)
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", str(library), str(source), "-ldl"], check=True,
                   capture_output=True)
    return library


def build_shim(directory: Path) -> Path:
    library = compile_library(SHIM_SOURCE, directory, "fault_shim")
    if library is None:
        raise FaultInjectionUnavailable("no C compiler (cc): install gcc to run the kill trials")
    return library


class ForkServer:
    """A server process with the shim preloaded; `run` forks one or more runs from it."""

    def __init__(self, work: Path):
        work.mkdir(parents=True, exist_ok=True)
        self.work = work
        env = {**os.environ, "LD_PRELOAD": str(build_shim(work)), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarks.fault_injection"], cwd=REPO, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.serial = 0
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the fork server did not start")

    def run(self, args: list[str], kill_at: int = 0, sig: int = signal.SIGKILL, kill_after: float | None = None,
            script: str = "preprocess_volume") -> RunResult:
        return self.run_together([dict(args=args, kill_at=kill_at, sig=sig, kill_after=kill_after, script=script)])[0]

    def run_together(self, runs: list[dict]) -> list[RunResult]:
        """Fork every run at once (each dict: args, kill_at, sig, kill_after, script) and wait for all."""
        for run in runs:
            self.serial += 1
            run.setdefault("script", "preprocess_volume")
            run["log"] = str(self.work / f"run{self.serial}")
        self.process.stdin.write(json.dumps(runs) + "\n")
        self.process.stdin.flush()
        codes = json.loads(self.process.stdout.readline())
        results = []
        for run, code in zip(runs, codes):
            log = Path(run["log"])
            calls = log.with_suffix(".calls")
            results.append(RunResult(code, int(calls.read_text()) if calls.exists() else None,
                                     read_and_remove(log.with_suffix(".out")), read_and_remove(log.with_suffix(".err"))))
            calls.unlink(missing_ok=True)
        return results

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_and_remove(path: Path) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    path.unlink(missing_ok=True)
    return text


# ----------------------------------------------------------------------------- the server side

def serve() -> None:
    import importlib

    import tensorstore  # noqa: F401 - imported once here, before any fork
    import torch  # noqa: F401
    from transformers import DINOv3ViTModel  # noqa: F401

    modules = {name: importlib.import_module(name) for name in SCRIPTS}
    shim = ctypes.CDLL(None)
    print("ready", flush=True)
    for line in sys.stdin:
        runs = json.loads(line)
        pids = [fork_run(modules[r["script"]], shim, r) for r in runs]
        killers = {pid: time.monotonic() + r["kill_after"] for pid, r in zip(pids, runs) if r.get("kill_after") is not None}
        print(json.dumps(wait_all(pids, killers)), flush=True)


def fork_run(module, shim, run: dict) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        log = Path(run["log"])
        for fd, suffix in ((1, ".out"), (2, ".err")):
            os.dup2(os.open(log.with_suffix(suffix), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        shim.fault_arm(ctypes.c_long(run.get("kill_at", 0)), ctypes.c_int(run.get("sig", signal.SIGKILL)))
        code = module.main(run["args"])
        calls = shim.fault_calls()  # read before the file below is written (that is no rename)
        sys.stdout.flush()
        sys.stderr.flush()
        log.with_suffix(".calls").write_text(str(calls))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported in the run's stderr, the run fails
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
    finally:
        os._exit(code)


def wait_all(pids: list[int], killers: dict[int, float]) -> list[int]:
    codes: dict[int, int] = {}
    while len(codes) < len(pids):
        for pid in pids:
            if pid in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG if killers else 0)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
            elif pid in killers and time.monotonic() >= killers[pid]:
                os.kill(pid, signal.SIGKILL)
                del killers[pid]
        if killers:
            time.sleep(0.002)
    return [codes[pid] for pid in pids]


if __name__ == "__main__":
    serve()
