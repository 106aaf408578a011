"""Memory-limited child processes through a memory cgroup (v1 or v2), for benchmarks that emulate
a device with less RAM than the model: the cgroup charges both anonymous memory and page cache, so a
limit below the model size forces mmap'd weights (or pack reads) back out to storage.

    with MemoryCgroup.create(limit) as cg:      # None (see why_unavailable()) without a writable cgroup
        p = subprocess.Popen(cmd, preexec_fn=cg.preexec())
        p.wait(); cg.peak_bytes(); cg.oom_killed()

The cgroup is made inside this process's own cgroup where possible, so every limit above it still
applies; it is removed on exit (also on exceptions and Ctrl-C; the child must have exited).
"""
from __future__ import annotations

import atexit
import itertools
import os
import time

_counter = itertools.count()
_live: set[str] = set()  # directories to remove at interpreter exit if a `with` never closed them
_why = "not probed yet"


def drop_file_cache(path) -> None:
    """Evict a file's pages from the page cache (cold-start runs). Pages still mapped somewhere stay,
    and so do dirty ones: a file written moments ago is flushed first, or it would stay cached."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _write(path: str, value) -> bool:
    try:
        with open(path, "w") as f:
            f.write(str(value))
        return True
    except OSError:
        return False


def _mounts(controller: str = "memory") -> list[tuple[str, str, str]]:
    """(version, mount point, mount root) of the cgroup mounts with `controller`, v1 first."""
    found = []
    for line in (read_text("/proc/self/mountinfo") or "").splitlines():
        left, _, right = line.partition(" - ")
        f, r = left.split(), right.split()
        if len(f) < 5 or len(r) < 3:
            continue
        root, point = f[3], f[4]
        if r[0] == "cgroup" and controller in r[2].split(","):
            found.append(("v1", point, root))
        elif r[0] == "cgroup2" and controller in (read_text(os.path.join(point, "cgroup.controllers")) or "").split():
            found.append(("v2", point, root))
    return sorted(found, key=lambda m: m[0])


def _own_path(version: str, controller: str = "memory") -> str:
    """This process's cgroup path in the hierarchy ("/" if unknown)."""
    for line in (read_text("/proc/self/cgroup") or "").splitlines():
        _, ctrls, path = line.split(":", 2)
        if (version == "v1" and controller in ctrls.split(",")) or (version == "v2" and ctrls == ""):
            return path
    return "/"


def own_dirs(controller: str):
    """(version, directory) of every `controller` cgroup from this process's own up to the root."""
    for version, point, root in _mounts(controller):
        own = _own_path(version, controller)
        d = os.path.normpath(os.path.join(point, os.path.relpath(own, root) if own.startswith(root) else "."))
        while d.startswith(point):
            yield version, d
            if d == point:
                break
            d = os.path.dirname(d)


def _parents() -> list[tuple[str, str]]:
    """Candidate (version, directory) to create the child cgroup in: our own cgroup, then the root."""
    out = []
    for version, point, root in _mounts():
        own = _own_path(version)
        rel = os.path.relpath(own, root) if own.startswith(root) else "."
        for d in (os.path.normpath(os.path.join(point, rel)), point):
            if (version, d) not in out:
                out.append((version, d))
    return out


def _meminfo_available() -> int | None:
    for line in (read_text("/proc/meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _stat_value(text: str | None, *keys: str) -> int:
    for line in (text or "").splitlines():
        k, _, v = line.partition(" ")
        if k in keys and v.strip().isdigit():
            return int(v)
    return 0


def _reclaimable_file_cache(stat: str | None, v2: bool) -> int:
    """File cache a memory cgroup charges but could drop: its file pages on both LRU lists (a file
    read twice is "active": a previous run's model in the same cgroup is) less those mapped by a
    process (in use; ours are not mapped yet). Counting inactive pages alone made a second run in
    the same cgroup see ~20 MiB less (SmolLM2 at 90 MiB: the runtime at 16.8 tok/s, then stock at 3.7)."""
    p = "" if v2 else "total_"
    inactive = _stat_value(stat, f"{p}inactive_file")
    files = inactive + _stat_value(stat, f"{p}active_file")
    mapped = _stat_value(stat, "file_mapped" if v2 else "total_mapped_file")
    return max(inactive, files - mapped)


def available_memory() -> tuple[int | None, str]:
    """Bytes this process may still use and where that figure comes from: the tightest of
    MemAvailable and, for every memory cgroup from this process's up to the root, its limit minus
    its usage plus the file cache it could drop. (None, why) if nothing is known."""
    best, where = _meminfo_available(), "MemAvailable"
    for version, d in own_dirs("memory"):
        stat = read_text(os.path.join(d, "memory.stat"))
        if version == "v2":
            limit, usage = read_text(os.path.join(d, "memory.max")), read_text(os.path.join(d, "memory.current"))
        else:
            limit, usage = read_text(os.path.join(d, "memory.limit_in_bytes")), read_text(os.path.join(d, "memory.usage_in_bytes"))
        lim = (limit or "").strip()
        if lim.isdigit() and int(lim) < 2**60 and (usage or "").strip().isdigit():
            free = int(lim) - int(usage) + _reclaimable_file_cache(stat, version == "v2")
            if best is None or free < best:
                best, where = max(free, 0), f"memory cgroup {d} (limit {int(lim)} bytes)"
    return best, where


class MemoryCgroup:
    """A fresh memory cgroup with a hard limit (no swap); a context manager that removes it."""

    def __init__(self, path: str, version: str, limit: int):
        self.path, self.version, self.limit = path, version, limit

    @staticmethod
    def why_unavailable() -> str:
        """Why the last create() returned None."""
        return _why

    @classmethod
    def create(cls, limit_bytes: int) -> "MemoryCgroup | None":
        global _why
        reasons = []
        if not _mounts():
            _why = "no memory cgroup controller is mounted"
            return None
        for version, parent in _parents():
            path = os.path.join(parent, f"ripple-bench-{os.getpid()}-{next(_counter)}")
            try:
                os.mkdir(path)
            except OSError as e:
                reasons.append(f"{parent}: {e.strerror}")
                continue
            _live.add(path)
            cg = cls(path, version, int(limit_bytes))
            if cg._apply_limit():
                return cg
            reasons.append(f"{parent}: cannot set a memory limit there")
            cg.close()
        _why = "no writable memory cgroup (" + "; ".join(reasons) + "); run as root to confine runs"
        return None

    def _apply_limit(self) -> bool:
        if self.version == "v1":
            ok = _write(self._f("memory.limit_in_bytes"), self.limit)
            if os.path.exists(self._f("memory.memsw.limit_in_bytes")):
                _write(self._f("memory.memsw.limit_in_bytes"), self.limit)  # no swapping out of the limit
            return ok
        ok = _write(self._f("memory.max"), self.limit)
        _write(self._f("memory.swap.max"), 0)
        return ok

    def _f(self, name: str) -> str:
        return os.path.join(self.path, name)

    def preexec(self):
        """A preexec_fn for subprocess.Popen: the child moves itself in before exec (raw syscalls only:
        it runs between fork and exec)."""
        procs = self._f("cgroup.procs").encode()

        def enter():
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)
        return enter

    def peak_bytes(self) -> int | None:
        """Highest charge (anon + page cache) seen; None where the kernel does not keep it (old v2)."""
        raw = read_text(self._f("memory.max_usage_in_bytes" if self.version == "v1" else "memory.peak"))
        return int(raw) if raw and raw.strip().isdigit() else None

    def oom_killed(self) -> bool | None:
        """Whether the kernel's OOM killer fired inside this cgroup (None if not knowable)."""
        raw = read_text(self._f("memory.oom_control" if self.version == "v1" else "memory.events"))
        for line in (raw or "").splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill":
                return int(v) > 0
        return None

    def close(self) -> None:
        """Remove the directory (retried: the kernel frees a cgroup shortly after its last task exits)."""
        for _ in range(100):
            try:
                os.rmdir(self.path)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)
        if not os.path.exists(self.path):
            _live.discard(self.path)

    def __enter__(self) -> "MemoryCgroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@atexit.register
def _cleanup() -> None:
    for path in list(_live):
        try:
            os.rmdir(path)
        except OSError:
            pass
