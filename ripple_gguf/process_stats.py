"""What one process used: peak RSS and anonymous memory from /proc, and per-phase runtime figures
from two `RippleLlama.ripple_stats()` snapshots. Shared by the CLI (`run`, `eval`) and the bench."""
from __future__ import annotations


def status_kb(field: str) -> int:
    """A /proc/self/status field in KiB (0 where unreadable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss() -> int:
    """Restart the kernel's peak-RSS counter (VmHWM) from the current RSS; returns that RSS in bytes.
    Called after the heavy imports, so the peak measures loading + generation, not the interpreter."""
    from . import runtime  # noqa: F401  (llama_cpp, numpy, gguf, ... imported before the reset)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return status_kb("VmRSS") * 1024


def storage_reads() -> tuple[int, int]:
    """(bytes this process has had read from storage: page faults, readahead and direct reads alike;
    major page faults) so far, (0, 0) where /proc does not say."""
    read = faults = 0
    try:
        with open("/proc/self/io") as f:
            read = next((int(ln.split()[1]) for ln in f if ln.startswith("read_bytes:")), 0)
        with open("/proc/self/stat") as f:
            faults = int(f.read().rsplit(")", 1)[1].split()[9])  # majflt, field 12
    except (OSError, ValueError, IndexError):
        pass
    return read, faults


def peak_rss() -> int:
    return status_kb("VmHWM") * 1024


def phase(stats_end: dict, stats_start: dict, tokens: int, seconds: float) -> dict:
    """Per-token figures of one phase from two ripple_stats() snapshots."""
    out = {"tokens": tokens, "seconds": round(seconds, 4),
           "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None}
    if stats_end.get("mode") != "sparse":
        return out
    d = {k: stats_end[k] - stats_start.get(k, 0) for k in
         ("tokens", "reads", "bytes_read", "cache_hits", "cache_misses", "active_neurons", "total_neurons", "io_seconds",
          "ahead_seconds", "ahead_wait_seconds")}
    n = d["tokens"] or 1
    lookups = d["cache_hits"] + d["cache_misses"]
    out.update(reads=d["reads"], bytes_read=d["bytes_read"], reads_per_token=round(d["reads"] / n, 3),
               bytes_per_token=round(d["bytes_read"] / n, 1),
               cache_hit_rate=round(d["cache_hits"] / lookups, 4) if lookups else None,
               predicted_density=round(d["active_neurons"] / d["total_neurons"], 4) if d["total_neurons"] else None,
               io_seconds=round(d["io_seconds"], 4),  # plans waiting for reads
               hidden_io_seconds=round(max(0.0, d["ahead_seconds"] - d["ahead_wait_seconds"]), 4))
    return out
