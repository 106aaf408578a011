#!/usr/bin/env python3
"""Fuzz campaign: damaged GGUFs and packs through `run`, `inspect`, `verify`, `pack` and the C API.

    tools/fuzz.py OUT.gguf [--cases 1000] [--seed 0] [--workers 2] [--timeout 60] [--json]

Each case copies OUT.gguf and OUT.ripple, damages one of them (bit flips, zeroed or random runs,
a truncation, or an absurd count / length / offset / shape / type written into a header field) in
one region (header, KV, tensor infos, bundle tables, record checksums, predictors, FFN or other
tensor data), and drives one entry point with it:
  run      `ripple-gguf run` in-process (greedy, 4 tokens, varied cache size and warm/cold cache)
  capi     ctypes: llama_ripple_register + llama_model_load_from_file + llama_decode, no Python checks
  inspect  `ripple-gguf inspect --json`;  verify  `ripple-gguf verify`
  pack     `ripple-gguf pack`'s code path (tiny calibration and predictors), over a damaged GGUF
Cases run in a few long-lived worker processes; the parent kills and restarts a worker that dies
(a crash: a signal) or exceeds --timeout (a hang). Outcomes per case: `refused` (exit 1 with one
`error:` line, RippleError, NULL model, non-zero llama_decode), `same` (ran, and produced the
undamaged run's tokens: the damage was never used), `diff` (ran, different tokens) or `traceback`
(any other exception). A `diff` is *silent damage* when the damaged bytes are covered by the pack's
checksums or binding (everything in the pack but alignment padding; the GGUF's header, tensor
infos, ripple.* keys and FFN tensor edges); damage to the GGUF's other weights or metadata is
`uncovered` (a stock GGUF carries no checksums). `verify` must refuse every covered damage.
Prints the counts; exit status 1 when there was a crash, traceback, hang, silent damage or a miss.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import select
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPT = "def main():\n    "
DRIVERS = (("run", 35), ("capi", 25), ("inspect", 15), ("verify", 20), ("pack", 5))
KINDS = ("flip", "flip", "zero", "random", "truncate", "absurd", "absurd")
ABSURD = (0, 1, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 32, 1 << 40, (1 << 63) - 1, (1 << 64) - 1)


# --- where things are in a GGUF file ----------------------------------------------------------------

def layout(path: Path) -> dict:
    """Regions (name -> [(lo, hi)]) and integer header fields [(offset, size, what)] of a GGUF."""
    from ripple_gguf.gguf_header import GGUFHeader
    h = GGUFHeader(path)
    data = path.read_bytes()
    ints = [(8, 8, "n_tensors"), (16, 8, "n_kv")]
    kv_end = 24
    ripple_kv = []
    for f in h.fields.values():
        ints.append((f.start, 8, "key length"))
        klen = struct.unpack_from("<Q", data, f.start)[0]
        at = f.start + 8 + klen
        ints.append((at, 4, "value type"))
        if f.type.name == "ARRAY":
            ints += [(at + 4, 4, "array type"), (at + 8, 8, "array count")]
        elif f.type.name == "STRING":
            ints.append((at + 4, 8, "string length"))
        if f.name.startswith("ripple."):
            ripple_kv.append((f.start, f.end))
        kv_end = max(kv_end, f.end)
    at = kv_end
    for _ in h.tensors:  # tensor infos: name, n_dims, ne[], type, offset
        ints.append((at, 8, "name length"))
        at += 8 + struct.unpack_from("<Q", data, at)[0]
        n_dims = struct.unpack_from("<I", data, at)[0]
        ints.append((at, 4, "n_dims"))
        at += 4
        for d in range(n_dims):
            ints.append((at + 8 * d, 8, "ne"))
        at += 8 * n_dims
        ints += [(at, 4, "tensor type"), (at + 4, 8, "tensor offset")]
        at += 12
    regions = {"header": [(0, 24)], "kv": [(24, kv_end)], "tinfo": [(kv_end, h.data_start)]}
    edges = []
    for t in h.tensors:
        lo, hi = t.data_offset, t.data_offset + t.n_bytes
        name = t.name
        if name.endswith("ffn_bundles"):
            key = "bundles"
        elif name.endswith("ffn_bundle_sums"):
            key = "sums"
        elif ".pred_" in name:
            key = "pred"
        elif name == "header_sum":
            key = "header_sum"
        elif ".ffn_" in name:
            key = "ffn_data"
            edges += [(lo, min(hi, lo + 65536)), (max(lo, hi - 65536), hi)]
        else:
            key = "data"
        regions.setdefault(key, []).append((lo, hi))
    covered = [(0, 24), (kv_end, h.data_start)] + ripple_kv + edges
    if h.get("general.architecture") == "ripple_pack":  # every byte of a pack is covered but padding
        covered = [(0, h.data_start)] + [(t.data_offset, t.data_offset + t.n_bytes) for t in h.tensors]
    return {"regions": regions, "ints": ints, "covered": covered, "size": len(data)}


def make_case(rng: random.Random, i: int, maps: dict) -> dict:
    driver = rng.choices([d for d, _ in DRIVERS], [w for _, w in DRIVERS])[0]
    target = "gguf" if driver == "pack" else rng.choice(("gguf", "pack", "pack"))
    m = maps[target]
    kind = rng.choice(KINDS)
    case = {"i": i, "driver": driver, "target": target, "kind": kind,
            "budget": rng.choice(("full", "half", "layer")), "cold": rng.random() < 0.5}
    if kind == "absurd":
        off, size, what = rng.choice(m["ints"])
        val = rng.choice(ABSURD + (m["size"], m["size"] * 2 + 7)) & ((1 << (8 * size)) - 1)
        case.update(region="header field: " + what, offset=off, length=size, value=val)
        return case
    region = rng.choice(sorted(m["regions"]))
    lo, hi = rng.choice(m["regions"][region])
    if hi <= lo:
        lo, hi = 0, 24
    off = rng.randrange(lo, hi)
    length = 1 if kind == "flip" else min(hi - off, rng.choice((1, 4, 16, 256, 4096, 65536)))
    case.update(region=region, offset=off, length=length, value=rng.randrange(1 << 30))
    return case


def damage(data: bytes, case: dict) -> bytes:
    b = bytearray(data)
    off, n, kind = case["offset"], case["length"], case["kind"]
    r = random.Random(case["value"])
    if kind == "truncate":
        return bytes(b[:off])
    if kind == "flip":
        for _ in range(r.randint(1, 8)):
            b[off] ^= 1 << r.randrange(8)
        if b[off] == data[off]:
            b[off] ^= 0x01
    elif kind == "zero":
        b[off:off + n] = bytes(n)
    elif kind == "random":
        b[off:off + n] = bytes(r.randrange(256) for _ in range(n))
    else:
        b[off:off + n] = case["value"].to_bytes(n, "little")
    return bytes(b)


def is_covered(case: dict, original: bytes, maps: dict) -> bool:
    """Did the damage change bytes the checksums/binding cover (truncation: always)?"""
    if case["kind"] == "truncate":
        return True
    changed = damage(original, case)
    idx = [k for k in range(case["offset"], case["offset"] + case["length"]) if changed[k] != original[k]]
    return any(lo <= k < hi for k in idx for lo, hi in maps[case["target"]]["covered"])


# --- the worker -------------------------------------------------------------------------------------

class Worker:
    """Runs cases in this process; keeps the undamaged originals and their reference outputs."""

    def __init__(self, gguf: Path, workdir: Path):
        from ripple_gguf.pack import open_pack, pack_path_for
        self.src = {"gguf": gguf.read_bytes(), "pack": pack_path_for(gguf).read_bytes()}
        self.dir = workdir
        self.g = workdir / "m.gguf"
        self.p = workdir / "m.ripple"
        pk = open_pack(gguf)
        self.layer = max(pk.n_ff) * pk.bundle_bytes
        self.ffn = pk.ffn_pack_bytes
        self.write(None)
        self.ref = {}
        for b in ("full", "half", "layer"):
            for cold in (False, True):
                self.ref[("run", b, cold)] = self.run({"budget": b, "cold": cold})[1]
        self.ref["capi"] = self.capi({"budget": "full", "cold": False})[1]
        if not all(self.ref.values()):
            raise SystemExit(f"the undamaged model does not run: {self.ref}")

    def write(self, case):
        for name, path in (("gguf", self.g), ("pack", self.p)):
            data = self.src[name]
            if case is not None and case["target"] == name:
                data = damage(data, case)
            path.write_bytes(data)

    def budget(self, case) -> int:
        return {"full": self.ffn, "half": max(self.layer, self.ffn // 2), "layer": self.layer}[case["budget"]]

    def cli(self, *args) -> tuple[int, str, str]:
        from ripple_gguf.cli import main
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in args])
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 2
        return rc, out.getvalue(), err.getvalue()

    def run(self, case) -> tuple[str, list | None, str]:
        args = ["run", self.g, "-p", PROMPT, "-n", 4, "--json", "--ctx", 64, "--threads", 1, "--io-threads", 2,
                "--cache-size", self.budget(case), "--t0-us", 50, "--bw-mbps", 1000]
        rc, out, err = self.cli(*args, *(["--cold-cache"] if case["cold"] else []))
        if rc == 0:
            return "ran", json.loads(out)["tokens"], ""
        return ("refused" if rc == 1 and err.strip().splitlines()[-1].startswith("error: ") else "traceback"), None, err[-300:]

    def capi(self, case) -> tuple[str, list | None, str]:
        import ctypes
        import llama_cpp
        from ripple_gguf.runtime import ripple_lib
        lib = ripple_lib()
        prm = lib.llama_ripple_default_params()
        prm.memory_budget, prm.warm_cache, prm.io_threads = self.budget(case), int(not case["cold"]), 2
        prm.t0_us, prm.bw_mbps = 50.0, 1000.0
        if lib.llama_ripple_register(str(self.g).encode(), str(self.p).encode(), ctypes.byref(prm)) != 0:
            return "refused", None, lib.llama_ripple_last_error(None).decode(errors="replace")
        mp = llama_cpp.llama_model_default_params()
        model = llama_cpp.llama_model_load_from_file(str(self.g).encode(), mp)
        lib.llama_ripple_unregister(str(self.g).encode())
        if not model:
            return "refused", None, lib.llama_ripple_last_error(None).decode(errors="replace")
        try:
            cp = llama_cpp.llama_context_default_params()
            cp.n_ctx, cp.n_batch, cp.n_threads, cp.n_threads_batch = 64, 64, 1, 1
            ctx = llama_cpp.llama_init_from_model(model, cp)
            if not ctx:
                return "refused", None, "no context"
            try:
                vocab = llama_cpp.llama_model_get_vocab(model)
                n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
                buf = (llama_cpp.llama_token * 64)()
                n = llama_cpp.llama_tokenize(vocab, PROMPT.encode(), len(PROMPT), buf, 64, True, True)
                if n <= 0:
                    return "refused", None, "tokenize failed"
                toks, out = list(buf[:n]), []
                for _ in range(4):
                    arr = (llama_cpp.llama_token * len(toks))(*toks)
                    if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(toks))) != 0:
                        return "refused", None, lib.llama_ripple_last_error(model).decode(errors="replace")
                    logits = llama_cpp.llama_get_logits_ith(ctx, -1)
                    best = max(range(n_vocab), key=lambda k: logits[k])
                    out.append(best)
                    toks = [best]
                return "ran", out, ""
            finally:
                llama_cpp.llama_free(ctx)
        finally:
            llama_cpp.llama_model_free(model)

    def case(self, case: dict) -> dict:
        self.write(case)
        t = time.perf_counter()
        try:
            if case["driver"] == "run":
                status, toks, msg = self.run(case)
                ref = self.ref[("run", case["budget"], case["cold"])]
            elif case["driver"] == "capi":
                status, toks, msg = self.capi(case)
                ref = self.ref["capi"]
            elif case["driver"] == "pack":
                from ripple_gguf.errors import RippleError
                from ripple_gguf.make_pack import PackOptions, build_pack
                self.p.unlink(missing_ok=True)
                try:
                    with contextlib.redirect_stderr(io.StringIO()):
                        build_pack(self.g, PackOptions(calib=[str(ROOT / "models/text/calib.txt")], calib_tokens=512,
                                                       rank=8, steps=10, n_ctx=64), log=lambda m: None)
                    status, msg = "ran", ""
                except RippleError as e:
                    status, msg = "refused", str(e)
                toks = ref = None
            else:
                rc, out, err = self.cli(case["driver"], self.g, *(["--json"] if case["driver"] == "inspect" else []))
                status = "ran" if rc == 0 else "refused" if rc == 1 and err.strip().startswith("error: ") else "traceback"
                msg, toks, ref = err[-300:], None, None
        except Exception:  # anything escaping the entry point is a traceback
            import traceback
            status, toks, ref, msg = "traceback", None, None, traceback.format_exc()[-600:]
        if status == "ran" and ref is not None:
            status = "same" if toks == ref else "diff"
        return {"i": case["i"], "status": status, "msg": msg, "seconds": round(time.perf_counter() - t, 3)}


def worker_main(gguf: str, scratch: str) -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # llama.cpp and friends write to fds 1/2: keep them off the protocol
    if not os.environ.get("FUZZ_VERBOSE"):
        os.dup2(devnull, 2)
    # the parent owns and removes the scratch directory: it kills workers (hangs, the campaign's end),
    # so a directory of the worker's own would be left behind in /tmp every time
    w = Worker(Path(gguf), Path(tempfile.mkdtemp(dir=scratch)))
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        proto.write(json.dumps(w.case(json.loads(line))) + "\n")


# --- the parent -------------------------------------------------------------------------------------

class Proc:
    def __init__(self, gguf: Path, threads: int, scratch: str):
        # the workers share the machine's cores: each capped to its share, or llama.cpp's spinning threads
        # (`pack` runs llama.cpp passes and torch) oversubscribe them and a case can take minutes
        env = {**os.environ, "RIPPLE_THREADS": str(threads)}
        self.p = subprocess.Popen([sys.executable, __file__, "--worker", str(gguf), "--scratch", scratch], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, bufsize=1, cwd=ROOT, env=env)
        ready = self.read(600)
        if not ready or not ready.get("ready"):
            raise SystemExit("a fuzz worker did not start (does the undamaged model run?)")
        self.case = None
        self.started = 0.0

    def read(self, timeout: float):
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not r:
            return None
        line = self.p.stdout.readline()
        return json.loads(line) if line else None

    def kill(self):
        self.p.kill()
        self.p.wait()


def campaign(gguf: Path, cases: int, seed: int, workers: int, timeout: float, log=print) -> dict:
    with tempfile.TemporaryDirectory(prefix="ripple-fuzz-") as scratch:
        return _campaign(gguf, cases, seed, workers, timeout, log, scratch)


def _campaign(gguf: Path, cases: int, seed: int, workers: int, timeout: float, log, scratch: str) -> dict:
    from ripple_gguf.pack import pack_path_for
    maps = {"gguf": layout(gguf), "pack": layout(pack_path_for(gguf))}
    originals = {"gguf": gguf.read_bytes(), "pack": pack_path_for(gguf).read_bytes()}
    rng = random.Random(seed)
    todo = [make_case(rng, i, maps) for i in range(cases)]
    pending = list(reversed(todo))
    counts, by_driver, notes, slowest = Counter(), Counter(), [], {}
    t0 = time.perf_counter()
    from ripple_gguf.cpus import usable_cpus
    threads = max(1, usable_cpus() // workers)
    pool = [Proc(gguf, threads, scratch) for _ in range(workers)]
    done = 0
    while done < cases:
        for w in pool:
            if w.case is None and pending:
                w.case, w.started = pending.pop(), time.time()
                w.p.stdin.write(json.dumps(w.case) + "\n")
        busy = [w for w in pool if w.case is not None]
        r, _, _ = select.select([w.p.stdout for w in busy], [], [], 1.0)
        for i, w in enumerate(pool):
            if w.case is None:
                continue
            res = None
            if w.p.stdout in r:
                line = w.p.stdout.readline()
                res = json.loads(line) if line else None
                if res is None:  # the worker died in this case
                    w.p.wait()
                    res = {"status": "crash", "msg": f"worker exited with {w.p.returncode}"}
            elif time.time() - w.started > timeout:
                w.kill()
                res = {"status": "hang", "msg": f"no answer in {timeout} s"}
            if res is None:
                continue
            case, status = w.case, res["status"]
            covered = is_covered(case, originals[case["target"]], maps)
            if status == "diff":
                status = "silent" if covered else "uncovered"
            if case["driver"] == "verify" and status == "same" and covered:
                status = "missed"  # verify passed a file with covered damage
            if case["driver"] == "verify" and status == "ran":
                status = "missed" if covered else "same"
            counts[status] += 1
            by_driver[(case["driver"], status)] += 1
            slowest[case["driver"]] = max(slowest.get(case["driver"], 0.0), res.get("seconds", timeout))
            if status in ("crash", "hang", "traceback", "silent", "missed"):
                notes.append({**case, **res, "status": status})
            done += 1
            if res["status"] in ("crash", "hang"):
                pool[i] = Proc(gguf, threads, scratch)
            else:
                w.case = None
            if done % 100 == 0:
                log(f"[{done}/{cases}] {dict(counts)}")
    for w in pool:
        w.kill()
    bad = sum(counts[k] for k in ("crash", "hang", "traceback", "silent", "missed"))
    return {"cases": cases, "seed": seed, "seconds": round(time.perf_counter() - t0, 1), "counts": dict(counts),
            "by_driver": {f"{d}:{s}": n for (d, s), n in sorted(by_driver.items())}, "failures": notes[:20],
            "slowest_seconds": slowest,
            "ok": bad == 0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", help="a converted GGUF with its pack next to it (the fuzz seed input)")
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(args.gguf, args.scratch)
        return 0
    res = campaign(Path(args.gguf), args.cases, args.seed, args.workers, args.timeout,
                   log=lambda m: print(m, file=sys.stderr, flush=True))
    c = res["counts"]
    summary = (f"fuzz: {res['cases']} cases (seed {res['seed']}) in {res['seconds']} s: "
               + ", ".join(f"{k} {c.get(k, 0)}" for k in ("refused", "same", "uncovered", "ran", "crash", "traceback",
                                                          "hang", "silent", "missed")))
    print(json.dumps(res, indent=1) if args.json else summary)
    if not args.json:
        for f in res["failures"]:
            print(f"  {f['status']}: {f['driver']} {f['target']} {f['kind']} {f['region']} @{f['offset']}+{f['length']}: "
                  f"{f.get('msg', '')[-200:]!r}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
