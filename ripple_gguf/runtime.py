"""`RippleLlama`: llama-cpp-python's `Llama` running each FFN sparsely from the offload pack.

The patched libllama (patches/0001-ripple-sparse-ffn.patch) exposes a small C API; we reach it
through ctypes on the library llama-cpp-python already loaded. The pack is registered for the GGUF
path *before* the model loads (so llama.cpp never prefetches or repacks the GGUF's FFN bytes), then
attached by the loader; every graph then computes predictor -> active neurons -> cache hits + merged
contiguous preads -> sparse FFN. Read failures during generation are sticky in the library: we
check after every decode and raise `RippleError` before any token is sampled from a bad batch.
"""
from __future__ import annotations

import ctypes
import re
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from .errors import RippleError
from .pack import Pack, open_pack, pack_path_for
from .quality import every_neuron_pays

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str | int | float) -> int:
    """'512MiB', '1.5G', '300k', '1048576' -> bytes (K/M/G/T and KiB/MiB/... are both powers of 1024,
    'KB/MB/GB' with a B but no i are powers of 1000)."""
    if isinstance(text, (int, float)):
        if text < 0:
            raise RippleError(f"memory budget {text} is negative")
        return int(text)
    m = _SIZE_RE.match(str(text))
    if not m:
        raise RippleError(f"cannot read memory size {text!r}; write it like 512MiB, 2GiB or 1000000")
    num, unit, binary = float(m.group(1)), m.group(2).lower(), m.group(3)
    power = "kmgt".index(unit) + 1 if unit else 0
    decimal = unit and not binary and str(text).strip().lower().endswith("b")
    return int(num * (1000 if decimal else 1024) ** power)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


_CTYPES = {"uint64_t": ctypes.c_uint64, "int64_t": ctypes.c_int64, "int32_t": ctypes.c_int32, "double": ctypes.c_double}


@dataclass(frozen=True)
class CField:
    """One field of a struct in include/llama-ripple.h, as the library describes it."""
    name: str
    ctype: type
    default: float
    doc: str


@dataclass(frozen=True)
class RippleC:
    """The ripple C API's structs, built from the layouts the library reports (llama-ripple.h defines
    each field once, in LLAMA_RIPPLE_PARAMS / LLAMA_RIPPLE_STATS): no copy to keep in step here."""
    params: type             # ctypes.Structure of struct llama_ripple_params
    stats: type              # ... of struct llama_ripple_stats
    param_fields: tuple      # CField per parameter, with the library's default and doc

    def param_default(self, name: str):
        f = next(f for f in self.param_fields if f.name == name)
        return f.ctype(int(f.default) if f.ctype is not ctypes.c_double else f.default).value


def c_struct(layout: str, name: str) -> tuple[type, tuple]:
    """(ctypes Structure, CFields) from a llama_ripple_*_layout() text; RippleError where the mirror
    ctypes would build does not have the library's offsets and size."""
    fields, offsets, size = [], [], None
    for line in layout.splitlines():
        parts = line.split("\t")
        if parts[0] == "sizeof" and len(parts) == 2:
            size = int(parts[1])
        elif len(parts) == 5 and parts[1] in _CTYPES:
            fields.append(CField(parts[0], _CTYPES[parts[1]], float(parts[3]), parts[4]))
            offsets.append(int(parts[2]))
        else:
            raise RippleError(f"the ripple library describes struct {name} in a form this ripple-gguf does not "
                              f"read ({line!r}): reinstall with tools/setup.sh")
    cls = type(name, (ctypes.Structure,), {"_fields_": [(f.name, f.ctype) for f in fields]})
    if size != ctypes.sizeof(cls) or [getattr(cls, f.name).offset for f in fields] != offsets:
        raise RippleError(f"struct {name}: the library's layout and its ctypes mirror disagree: reinstall with tools/setup.sh")
    return cls, tuple(fields)


_lib_cache = None
_c_cache: RippleC | None = None


def ripple_lib():
    """The libllama llama-cpp-python loaded, with the ripple C API typed; RippleError if unpatched."""
    global _lib_cache
    if _lib_cache is not None:
        return _lib_cache
    lib = llama_cpp.llama_cpp._lib
    if not hasattr(lib, "llama_ripple_register"):
        raise RippleError("the installed llama-cpp-python was built without the ripple runtime patch; "
                          "run tools/setup.sh (or use --dense)")
    global _c_cache
    p, vp = ctypes.c_char_p, ctypes.c_void_p
    if not hasattr(lib, "llama_ripple_params_layout"):
        raise RippleError("the installed llama-cpp-python was built from an older ripple runtime patch; "
                          "run tools/setup.sh")
    for fn in (lib.llama_ripple_params_layout, lib.llama_ripple_stats_layout):
        fn.argtypes, fn.restype = [], p
    params, fields = c_struct(lib.llama_ripple_params_layout().decode(), "llama_ripple_params")
    stats, _ = c_struct(lib.llama_ripple_stats_layout().decode(), "llama_ripple_stats")
    c = RippleC(params, stats, fields)
    sig = {
        "llama_ripple_default_params": ([], c.params),
        "llama_ripple_register": ([p, p, ctypes.POINTER(c.params)], ctypes.c_int32),
        "llama_ripple_unregister": ([p], None),
        "llama_ripple_is_attached": ([vp], ctypes.c_bool),
        "llama_ripple_get_stats": ([vp, ctypes.POINTER(c.stats)], ctypes.c_int32),
        "llama_ripple_reset_stats": ([vp], None),
        "llama_ripple_last_error": ([vp], p),
        "llama_ripple_set_trace": ([vp, ctypes.c_bool], None),
        "llama_ripple_get_trace": ([vp, ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64),
                                    ctypes.c_int64], ctypes.c_int64),
        "llama_ripple_detach": ([vp], ctypes.c_int32),
        "llama_ripple_inject_fault": ([vp, ctypes.c_int64, ctypes.c_int32], ctypes.c_int32),  # test hook
        "llama_ripple_set_thresholds": ([vp, ctypes.POINTER(ctypes.c_float), ctypes.c_int32], ctypes.c_int32),
        "llama_ripple_set_floor": ([vp, ctypes.c_float], ctypes.c_int32),
    }
    for name, (args, res) in sig.items():
        if name in ("llama_ripple_inject_fault", "llama_ripple_set_thresholds", "llama_ripple_set_floor") and not hasattr(lib, name):
            continue  # in libraries built from patches of this version on
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    _lib_cache, _c_cache = lib, c
    return lib


def ripple_c() -> RippleC:
    """The C API's structs (see RippleC); RippleError where the library is not the patched one."""
    ripple_lib()
    return _c_cache


def runtime_param_defaults() -> dict:
    """{parameter: the library's default} for help texts; {} where the library cannot be loaded."""
    try:
        c = ripple_c()
    except (RippleError, OSError):
        return {}
    return {f.name: c.param_default(f.name) for f in c.param_fields}


@dataclass
class RippleOptions:
    """What sizes the FFN cache (memory_budget.py; the runtime's other parameters go to the library as
    given, each defaulting to its own default in include/llama-ripple.h)."""
    memory_budget: int | str | None = None   # everything the process may use, bytes or "2GiB" (default:
                                             # what the machine or its memory cgroup has available)
    cache_size: int | str | None = None      # or: the neuron cache alone
    cache_ratio: float | None = None         # or: the neuron cache as this share of the FFN bytes
    all_active: bool = False                 # debug: predictor off, every neuron computed


def ffn_layout(model_path: str, pack: Pack, streamed: bool, chunk_bytes: int | None = None) -> tuple[int, int]:
    """(the whole FFN's bytes, the smallest FFN cache the runtime accepts) where the FFN runs from: the
    pack's bundles (one chunk of slots: a cache below one layer plans each layer in chunks) or, streamed
    dense, the GGUF's own tensors (two staging buffers of at most a layer: larger layers are read in row
    chunks)."""
    from .memory_budget import stream_layout
    return stream_layout(model_path, chunk_bytes) if streamed else (pack.every_slot_bytes, pack.min_cache_bytes)


def budget_bytes(layout: tuple[int, int], opts: RippleOptions) -> int:
    """The FFN cache size in bytes for --cache-size/--cache-ratio (the whole FFN when neither is
    given: the caller then splits --memory-budget or the available memory, memory_budget.py), refused
    up front below the minimum. `layout`: (whole FFN, minimum), see ffn_layout."""
    if sum(v is not None for v in (opts.memory_budget, opts.cache_size, opts.cache_ratio)) > 1:
        raise RippleError("pass one of a memory budget, a cache size or a cache ratio, not several")
    ffn, minimum = layout
    if opts.cache_ratio is not None:
        if not 0.0 < opts.cache_ratio <= 1.0:
            raise RippleError("--cache-ratio must be in (0, 1], e.g. 0.25")
        budget = int(ffn * opts.cache_ratio)
    elif opts.cache_size is not None:
        budget = parse_size(opts.cache_size)
    else:
        return ffn
    if budget < minimum:
        raise RippleError(f"FFN cache {fmt_bytes(budget)} ({budget} bytes) is below what one batch needs; "
                          f"the minimum for this model is {fmt_bytes(minimum)} ({minimum} bytes: one chunk of neurons, "
                          "or two staging buffers where a dense point streams them): pass "
                          f"--cache-size {minimum} or more (or --cache-ratio {minimum / ffn:.3f})")
    return budget


def verified_pack(model_path: str, pack_path: str | None = None) -> Pack:
    """The pack for a GGUF, verified against it (binding, version, truncation); RippleError otherwise.
    The predictors are left unread: the library reads (and checks) its own copy."""
    import gc
    pack = open_pack(model_path, pack_path, predictors=False)
    gc.collect()  # the readers of both files (and their per-element KV arrays) go now, not later
    return pack


def choose_point(pack: Pack, quality) -> int:
    """The stored operating point for a perplexity budget ('2%', 0.02; 0 = dense)."""
    from .quality import OperatingPoint, choose, parse_budget
    budget = parse_budget(quality)
    return choose([OperatingPoint(float(d), t, float(q), float(f)) for d, t, q, f in
                   zip(pack.op_density, pack.op_thresholds, pack.op_ppl_increase, pack.op_floor)], budget)


def computes_every_neuron(pk: Pack, index: int) -> bool:
    """Does stored operating point `index` compute every neuron (no predictor needed)?"""
    from .quality import DENSE_THRESHOLD
    return float(pk.op_density[index]) >= 1.0 and float(pk.op_floor[index]) in (0.0, 1.0) \
        and bool(np.all(pk.op_thresholds[index] <= np.float32(DENSE_THRESHOLD)))


def loads_predictors(pk: Pack, point: int, stock_when_dense: bool = True) -> bool:
    """Does RippleLlama load the predictors when it attaches `pk` at `point`? Not at a point that
    computes every neuron (they would only take memory: ~150 MiB at 8B size), unless the caller keeps
    them to move along the curve: one that lets dense points run stock does not (see ripple_set_point)."""
    return not (stock_when_dense and computes_every_neuron(pk, point))


def predictor_bytes(pk: Pack, point: int, stock_when_dense: bool = True) -> int:
    """Memory the predictors take when RippleLlama attaches `pk` at `point`."""
    return max(0, pk.file_bytes - pk.ffn_pack_bytes) if loads_predictors(pk, point, stock_when_dense) else 0


HOLD_ALL = 2**62  # params.weight_bytes: every non-FFN weight the runtime may hold


def _non_ffn_weights(asked: bool | int | str | None, split: dict, cache: int, kwargs) -> tuple[int | None, str]:
    """How RippleLlama keeps the non-FFN weights: (bytes for the runtime to hold in memory, the largest
    tensors first, the rest mapped (params.weight_bytes); None: llama.cpp reads them all (a use_mmap=False
    the caller passed), and why. `asked` (resident_weights=: True, False or a size to hold) or the
    caller's use_mmap decide when given, else memory_budget.resident_weight_bytes."""
    from .memory_budget import resident_weight_bytes
    if isinstance(asked, bool):
        return (HOLD_ALL if asked else 0), f"resident_weights={asked}"
    if asked is not None:
        return parse_size(asked), f"resident_weights={asked}"
    if "use_mmap" in kwargs:
        return (None if not kwargs["use_mmap"] else 0), f"use_mmap={kwargs['use_mmap']}"
    held = resident_weight_bytes(split, cache)
    return (HOLD_ALL if held >= split["non_ffn_weights"] else held), \
        "they do not all fit next to the neuron cache in the memory available"


def _describe_non_ffn(held: int | None, why: str, st: dict) -> str:
    """RippleLlama.ripple_non_ffn: "resident", "partly resident (...)" or "mapped (why)"."""
    if held is None or not st["mapped_weight_bytes"]:  # (a repacked weight is a copy in memory already)
        return "resident"
    # a mapped output matrix beside a streamed FFN is read in chunks through its staging buffers
    out = f"; the output matrix read in {st['output_chunks']} chunks" if st.get("output_chunks") else ""
    if st["pinned_weight_bytes"]:
        return (f"partly resident ({st['pinned_weight_bytes'] / 2**20:.1f} MiB held, "
                f"{st['mapped_weight_bytes'] / 2**20:.1f} MiB mapped: {why}{out})")
    return f"mapped ({why}{out})"


def _direct_by_default(split: dict | None) -> bool:
    """Read the pack with O_DIRECT unless asked otherwise? Where the model does not fit in the memory
    available: buffered reads would keep a second copy of what the neuron cache holds in the page cache,
    charged to the same memory limit and pushing out the mapped weights. Not when a cache size was given
    (no split) or the available memory is unknown."""
    from .memory_budget import whole_model_fits
    return split is not None and split.get("available") is not None and not whole_model_fits(split)


def _point_info(pk: Pack, index: int) -> dict:
    return {"index": index, "density": float(pk.op_density[index]), "floor": float(pk.op_floor[index]),
            "ppl_increase": float(pk.op_ppl_increase[index]), "default": index == pk.op_default}


TIGHT_UBATCH = 64  # llama.cpp's batch size where memory is tight (see RippleLlama._split)


def streams(pk: Pack, point: int, stock_when_dense: bool = True, all_active: bool = False) -> bool:
    """Does RippleLlama stream the GGUF's own FFN tensors and compute every neuron (llama-ripple-stream.cpp)
    at stored operating point `point`? At a point this dense the pack's bundles would be read nearly
    whole, and they are more bytes than the GGUF's tensors (down rows requantized per neuron, Q8_0 for
    a Q4_1 model: +23%) in per-neuron runs computed by our kernels; streamed, each layer is one large
    read computed by llama.cpp's own kernels, exactly (SmolLM2 Q4_1 at 75% of its size in a cgroup:
    30.5 vs 15.3 tok/s). Not where the caller keeps the predictors to move along the curve
    (stock_when_dense=False) or asked for the pack's own every-neuron path (all_active)."""
    return stock_when_dense and not all_active and every_neuron_pays(pk, point)


class RippleLlama(llama_cpp.Llama):
    """A `llama_cpp.Llama` whose FFNs run sparsely from `OUT.ripple` (found next to the GGUF).

    RippleLlama("m.gguf", memory_budget="1GiB")         # everything the process may use (default: what
                                                        # is available); or cache_size="256MiB" / cache_ratio=0.25
    RippleLlama("m.gguf", dense=True)                   # the same GGUF on llama.cpp's stock path
    RippleLlama("m.gguf", dense_fallback=True)          # stock path with a warning if the pack is unusable
    RippleLlama("m.gguf", pack=verified_pack("m.gguf"))  # reuse a pack verified earlier
    RippleLlama("m.gguf", quality="1%")                 # the sparsest stored operating point within +1%
                                                        # perplexity on calibration text (default: the pack's)
    At an operating point where quality.every_neuron_pays (dense enough, or the pack would read nearly
    every byte anyway) every neuron is computed from the GGUF's own FFN tensors, streamed where they do not all fit (see streams; stream_dense=False: the pack's
    bundles), and with no budget given the stock path runs where the whole model fits (see
    ripple_stats()["reason"]); stock_when_dense=False keeps the pack and its predictors attached. On the
    runtime the non-FFN weights are held in memory where they fit next to the FFN cache, as many as fit
    where not all do, the largest tensors first, the rest mapped (resident_weights=True/False forces it
    either way; a size holds that much); a mapped output matrix beside a streamed FFN is multiplied in
    chunks read through the FFN's staging buffers where the page cache does not hold it (stream_output:
    1 that, 2 always read, 0 never; output_chunk_bytes: their largest size). A streamed layer larger
    than the staging buffers (at least stream_chunk_bytes, default 2 MiB, at most a layer) is read and
    computed in row chunks that fit one.
    A use_mmap= the caller passes decides it too (use_mmap=False: resident).
    Everything else (n_ctx, n_threads, chat_format, verbose, ...) goes to `llama_cpp.Llama`.
    """

    def __init__(self, model_path: str, *, pack_path: str | None = None, pack: Pack | None = None,
                 memory_budget: int | str | None = None, cache_size: int | str | None = None,
                 cache_ratio: float | None = None, dense: bool = False, dense_fallback: bool = False,
                 all_active: bool = False, io_threads: int | None = None, direct_io: bool | None = None,
                 pin_percent: int | None = None, t0_us: float | None = None, bw_mbps: float | None = None,
                 merge_gap_bytes: int | None = None, threshold_offset: float | None = None,
                 warm_cache: bool | None = None, read_ahead: bool | None = None, quality=None,
                 stock_when_dense: bool = True, resident_weights: bool | int | str | None = None,
                 stream_dense: bool | None = None, stream_prefill: int | None = None,
                 stream_output: int | None = None, output_chunk_bytes: int | None = None,
                 stream_chunk_bytes: int | None = None, **kwargs):
        self.ripple_pack: Pack | None = None
        self.ripple_dense_reason: str | None = None
        self.ripple_point: dict | None = None
        self.ripple_budget_split: dict | None = None  # how the default cache size was found (None: given)
        self.ripple_non_ffn: str | None = None  # "resident", "partly resident (...)" or "mapped (why)" on the runtime
        self._threshold_offset = float(threshold_offset or 0.0)
        self._no_predictors = False  # attached at a dense point without the predictors
        self._streamed = False       # the FFN streamed from the GGUF's own tensors (params.stream_dense)
        self._prefill_tokens = 0     # beside the pack: batches this long stream the dense FFN (0: none)
        self._prefill_given = stream_prefill is not None
        self._stream_chunk = stream_chunk_bytes  # the streamed FFN's smallest staging buffer (None: the library's)
        self._ripple_busy = threading.Lock()
        model_path = str(model_path)
        if not Path(model_path).is_file():
            raise RippleError(f"{model_path}: no such file; pass the path of a converted .gguf")
        opts = RippleOptions(memory_budget, cache_size, cache_ratio, all_active)
        kwargs.setdefault("n_gpu_layers", 0)
        if dense:
            self.ripple_dense_reason = "dense requested"
            super().__init__(model_path, **kwargs)
            return
        try:
            pack = pack or verified_pack(model_path, pack_path)
            point = pack.op_default if quality is None else choose_point(pack, quality)
            # streamed (a dense point) where its two staging buffers fit, else the pack's bundles (one layer)
            tries = [bool(stream_dense)] if stream_dense is not None else \
                [True, False] if streams(pack, point, stock_when_dense, opts.all_active) else [False]
            given = opts.cache_size is not None or opts.cache_ratio is not None
            for i, self._streamed in enumerate(tries):
                last = i == len(tries) - 1
                self._no_predictors = self._streamed or (not opts.all_active and not loads_predictors(pack, point, stock_when_dense))
                sparse = not (self._streamed or self._no_predictors or opts.all_active)
                from .memory_budget import STREAM_PREFILL_TOKENS
                self._prefill_tokens = (STREAM_PREFILL_TOKENS if stream_prefill is None else max(0, int(stream_prefill))) \
                    if sparse else 0
                try:
                    budget, default_cache, split = self._split(model_path, pack, point, opts, kwargs)
                except RippleError:  # below the stream's minimum: the pack's may still fit
                    if last:
                        raise
                    continue
                if last or given or not (split.get("below_minimum") and not split.get("mapped_fits")):
                    break
            if not given:
                budget, self.ripple_budget_split = default_cache, split
            held, why_held = _non_ffn_weights(resident_weights, split, budget, kwargs)
            resident = held is None or held > 0
            if direct_io is None:
                direct_io = _direct_by_default(self.ripple_budget_split)
            if stock_when_dense and stream_dense is not True and self._stock_is_the_same(model_path, pack, point, opts, kwargs, resident):
                return
            asked = point
            if self._streamed:  # every neuron: the dense point, exact
                point = 0
            lib = ripple_lib()
        except RippleError as e:
            if not dense_fallback:
                raise
            msg = f"ripple: {e}; running the stock dense path instead"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            print(f"warning: {msg}", file=sys.stderr)
            self.ripple_dense_reason = str(e)
            super().__init__(model_path, **kwargs)
            return

        if held is None:  # the caller's use_mmap=False: llama.cpp reads every non-lazy tensor, the FFN stays lazy
            kwargs["use_mmap"] = False
        if split.get("n_ubatch") == TIGHT_UBATCH and "n_ubatch" not in kwargs and "n_batch" not in kwargs:
            kwargs["n_ubatch"] = TIGHT_UBATCH  # the split counted llama.cpp's compute buffer at this batch size
        # the library's defaults (include/llama-ripple.h), then what the caller gave, then what this split decided
        params = lib.llama_ripple_default_params()
        given_params = {"io_threads": io_threads, "t0_us": t0_us, "bw_mbps": bw_mbps, "merge_gap_bytes": merge_gap_bytes,
                        "threshold_offset": threshold_offset, "warm_cache": warm_cache, "read_ahead": read_ahead,
                        "stream_output": stream_output, "output_chunk_bytes": output_chunk_bytes,
                        "stream_chunk_bytes": stream_chunk_bytes}
        for name, value in given_params.items():
            if value is not None:
                setattr(params, name, type(getattr(params, name))(value))
        if params.io_threads < 1:
            raise RippleError("io_threads (--io-threads) must be at least 1")
        params.memory_budget = budget
        params.direct_io = int(bool(direct_io))
        params.all_active = int(bool(all_active) or self._no_predictors)
        if pin_percent is not None:
            params.pin_percent = int(pin_percent)
        elif all_active or self._no_predictors:
            # every token needs every neuron at a dense point: a cyclic sweep larger than the cache, where
            # anything unpinned is evicted before it is used again (SmolLM2 Q4_1 at 75% of its size: hit
            # rate 0.27 of an ideal 0.34 with half pinned); elsewhere the library's split (half S3-FIFO)
            params.pin_percent = 100
        params.stream_dense = int(self._streamed)
        params.weight_bytes = held or 0
        params.stream_prefill_tokens = self._prefill_tokens
        mp = model_path.encode()
        if lib.llama_ripple_register(mp, str(pack.path).encode(), ctypes.byref(params)) != 0:
            raise RippleError(lib.llama_ripple_last_error(None).decode(errors="replace"))
        try:
            super().__init__(model_path, **kwargs)
        except Exception as e:
            lib.llama_ripple_unregister(mp)
            err = lib.llama_ripple_last_error(None).decode(errors="replace")
            raise RippleError(err or f"llama.cpp could not load {model_path} ({e})") from None
        lib.llama_ripple_unregister(mp)
        if resident:
            # the page cache the load read the held weights through (llama.cpp's prefetch of the mapping,
            # or its buffered reads) is a second copy the memory limit would charge
            from .cgroup import drop_file_cache
            drop_file_cache(model_path)
        if not lib.llama_ripple_is_attached(self.model):
            err = lib.llama_ripple_last_error(None).decode(errors="replace")
            raise RippleError(f"the ripple pack was not attached to {model_path}: {err or 'unknown reason'}")
        self.ripple_pack = pack
        self.ripple_non_ffn = _describe_non_ffn(held, why_held, self.ripple_stats())
        self.ripple_set_point(point)
        if asked != point:  # a sparse point where every_neuron_pays: every neuron runs instead
            self.ripple_point["asked"] = _point_info(pack, asked)

    def _split(self, model_path: str, pack: Pack, point: int, opts: RippleOptions, kwargs) -> tuple[int, int, dict]:
        """(the FFN cache asked for, the default one, how the memory splits) for the FFN the runtime
        would run from (self._streamed); RippleError when the budget cannot hold its minimum. Where
        the split (default or from a given budget) is tight it is made without the staging of streamed prompt batches
        (self._prefill_tokens: 0), and, where the caller set no batch size, for llama.cpp batches of
        TIGHT_UBATCH tokens (split["n_ubatch"]): its compute buffer is sized for its largest batch
        (SmolLM2 at n_ctx 512: 98 MiB for 512 tokens, 12 MiB for 64), and what that frees holds weights."""
        from .memory_budget import default_cache_budget, prompt_staging_bytes
        layout = ffn_layout(model_path, pack, self._streamed, self._stream_chunk)
        budget = budget_bytes(layout, opts)
        asked_ub = kwargs.get("n_ubatch") or kwargs.get("n_batch")
        ub = int(asked_ub or 512)
        keep = self._prefill_given  # a stream_prefill the caller gave stays
        tries = [(ub, self._prefill_tokens)] + ([(ub, 0)] if self._prefill_tokens and not keep else [])
        if asked_ub is None:
            tries.append((TIGHT_UBATCH, self._prefill_tokens if keep else 0))
        # the same for every try (each stream_layout parses the GGUF header)
        n_ctx = int(kwargs.get("n_ctx", 512) or 512)
        predictors = 0 if self._no_predictors or opts.all_active else predictor_bytes(pack, point, False)
        any_prefill = any(p for _, p in tries)
        two_layers = prompt_staging_bytes(model_path) if self._streamed or any_prefill else 0
        staging = two_layers if any_prefill else 0
        total = None if opts.memory_budget is None else parse_size(opts.memory_budget)
        # the next (smaller) llama.cpp batch where the FFN room is short of two whole layers where they
        # stream, of one layer of bundles where not, even though chunked layers need less: its compute
        # buffer is cache (a 0.5B-shaped Q8_0 at 75% of its size: 512-token batches left 86 MiB of cache,
        # 64-token ones 143)
        roomy = two_layers if self._streamed else pack.layer_cache_bytes
        for i, (ub, prefill) in enumerate(tries):
            try:
                default_cache, split = default_cache_budget(
                    model_path, n_ctx, budget, layout[1], predictors, staging=staging if prefill else 0,
                    total=total, n_ubatch=ub, logits_all=bool(kwargs.get("logits_all")), streamed=self._streamed)
            except RippleError:  # a given budget below the minimum: without the staging it may hold
                if i == len(tries) - 1:
                    raise
                continue
            split["n_ubatch"] = ub
            if split["ffn_room"] is None or split["ffn_room"] - predictors >= roomy:  # (>= the minimum)
                break
        # no staging where no batch can be that long (llama.cpp splits batches into n_ubatch tokens)
        self._prefill_tokens = prefill if prefill and prefill <= ub else 0
        return budget, default_cache, split

    def _stock_is_the_same(self, model_path: str, pack: Pack, point: int, opts: RippleOptions, kwargs,
                           resident: bool) -> bool:
        """At a (nearly) dense operating point with no budget given, where the whole model fits,
        llama.cpp's stock path runs, saying why: the runtime would compute the same FFN (streamed, with
        every layer in memory: the same speed, 1.0-1.07x); at a sparse point too where the split leaves
        the neuron cache only part of the pack. When the model does not fit, the runtime runs
        wherever its fixed memory fits: with the non-FFN weights resident where they fit next to a
        cache, else mapped with the minimum cache (memory_budget.mapped_pack_fits). It streams the
        GGUF's own FFN tensors in whole-layer direct reads (a dense point; see streams) or reads the
        pack's misses, where stock re-reads whatever of the whole model its page cache cannot hold
        (SmolLM2 Q4_1 in a cgroup of 75% / 50% of its size, weights mapped: 30.5 / 16.8 vs 9.4 / 6.0
        tok/s). Where not even that fits, stock (its mmap'd weights are page cache the kernel
        reclaims: slower, never an OOM kill). Loads stock and returns True when that is the case."""
        from .memory_budget import MIB, whole_model_fits
        split = self.ripple_budget_split  # None when --cache-size/--cache-ratio was given
        density = float(pack.op_density[point])
        if split is not None and opts.memory_budget is None and not opts.all_active and split.get("below_minimum") \
                and not split.get("mapped_fits"):
            # Not even the pack path's fixed memory plus one layer of cache fits what is available, with
            # the non-FFN weights mapped either: its cache, predictors and buffers cannot be reclaimed,
            # stock's mapped weights can (ReLU2 bench model at 25% of its size in a cgroup: default
            # settings were OOM-killed on the pack path). The sizes are estimates (memory_budget.py), so
            # near the edge this errs towards stock. Stock too gets llama.cpp batches of TIGHT_UBATCH
            # tokens unless the caller set a size: its compute buffer is sized for the largest batch.
            if "n_ubatch" not in kwargs and "n_batch" not in kwargs:
                kwargs["n_ubatch"] = TIGHT_UBATCH
            return self._load_stock(model_path, kwargs, pack, point, (
                f"the runtime's fixed memory and its minimum FFN cache do not fit in the "
                f"{split['available'] / MIB:.0f} MiB available ({split['available_from']}), not even with "
                "the non-FFN weights mapped: llama.cpp's stock path, whose mapped weights the kernel can "
                "reclaim (slower, but never killed for memory); pass --cache-size to force the pack path"))
        if opts.all_active or opts.memory_budget is not None or split is None:
            return False
        where = f"{split['available'] / MIB:.0f} MiB available ({split['available_from']})" \
            if split.get("available") is not None else "unknown available memory"
        if not every_neuron_pays(pack, point):
            if not whole_model_fits(split) or split["cache"] >= pack.every_slot_bytes:
                return False
            # a sparse point where the whole model fits but the split leaves the neuron cache only part
            # of the pack: the pack path would read misses every token, stock reads nothing (the ReLU2
            # bench model in a cgroup of stock's own size: 181 vs 2643 tok/s, 6 of its 12 MiB cached)
            return self._load_stock(model_path, kwargs, pack, point, (
                f"the whole model fits in {where}, where the neuron cache would hold "
                f"{split['cache'] / MIB:.1f} of the pack's {pack.every_slot_bytes / MIB:.1f} MiB and read the "
                f"rest every token: llama.cpp's stock path, which reads nothing once loaded (--keep-pack, "
                f"stock_when_dense=False, runs operating point {point} on the pack)"))
        if not whole_model_fits(split) and (resident or split.get("mapped_fits")):
            # the pack path reads only FFN misses, in merged direct reads, where stock re-reads
            # whatever of the whole model its page cache cannot hold
            return False
        fits = (f"the whole model fits in {where}" if whole_model_fits(split) else
                f"neither the model nor the runtime's fixed memory fit in {where}")
        what = "computes every neuron" if density >= 1.0 else f"computes {100 * density:.0f}% of the neurons"
        return self._load_stock(model_path, kwargs, pack, point, (
            f"operating point {point} {what} and {fits}: llama.cpp's stock path, which computes every neuron "
            "(--keep-pack, stock_when_dense=False, runs this point on the pack)"))

    def _load_stock(self, model_path: str, kwargs, pack: Pack, point: int, reason: str) -> bool:
        """Load the GGUF on llama.cpp's stock path at `point` (what ripple_stats reports), saying why."""
        self.ripple_dense_reason = reason
        super().__init__(model_path, **kwargs)
        self.ripple_point = {**_point_info(pack, point), "path": "stock"}
        return True

    def close(self) -> None:
        if hasattr(self, "_stack"):  # also when __init__ failed before llama_cpp.Llama set up
            super().close()

    # --- sparse-runtime state -------------------------------------------------------------------

    @property
    def ripple_streamed(self) -> bool:
        """Is the FFN the GGUF's own tensors, streamed (a dense point), rather than the pack's bundles?"""
        return self._streamed and self.ripple_active

    @property
    def ripple_active(self) -> bool:
        return self.ripple_pack is not None

    def ripple_error(self) -> str | None:
        if not self.ripple_active:
            return None
        lib = ripple_lib()
        st = ripple_c().stats()
        if lib.llama_ripple_get_stats(self.model, ctypes.byref(st)) != 0 or not st.error:
            return None
        return lib.llama_ripple_last_error(self.model).decode(errors="replace") or "ripple runtime error"

    def check_ripple(self) -> None:
        """Raise RippleError if a pack read failed (the last batch's logits are then garbage)."""
        err = self.ripple_error()
        if err:
            raise RippleError(f"sparse FFN failed: {err}")

    def eval(self, tokens):
        # one decode at a time per model (the runtime's neuron cache is the model's, not the context's)
        if not self._ripple_busy.acquire(blocking=False):
            raise RippleError("another decode is running on this model; RippleLlama is not thread-safe "
                              "(serialize calls, or load one model per thread)")
        try:
            super().eval(tokens)
        except RuntimeError:
            self.check_ripple()  # a failed pack read makes llama_decode fail: say which file and why
            raise
        finally:
            self._ripple_busy.release()
        self.check_ripple()

    def sample(self, *args, **kwargs):
        # llama-cpp-python's sample() builds a sampler chain per call and drops it; the chain's
        # llama.cpp side (a candidate array of n_vocab entries: 576 KiB on SmolLM2, 1.7 MiB on Qwen2's
        # vocabulary) is freed only when Python's cycle collector gets to it, which a decode loop
        # rarely triggers: 40 calls grew RssAnon 23 MiB, and a loop of them was OOM-killed in a cgroup
        # where generate() ran. Close the temporary chain here, as soon as it has sampled.
        if self._sampler is not None:
            return super().sample(*args, **kwargs)
        made, init = [], self._init_sampler
        self._init_sampler = lambda *a, **k: made.append(init(*a, **k)) or made[-1]
        try:
            return super().sample(*args, **kwargs)
        finally:
            del self._init_sampler  # (the instance attribute: the class's method again)
            for sampler in made:
                sampler.close()

    def ripple_stats(self) -> dict:
        """Counters since load (or the last ripple_reset_stats): tokens, reads (syscalls), bytes read
        (counted at the syscall), cache hits/misses, I/O seconds, predicted density, and the setup."""
        if not self.ripple_active:
            return {"mode": "dense", "reason": self.ripple_dense_reason}
        lib, c = ripple_lib(), ripple_c()
        st = c.stats()
        if lib.llama_ripple_get_stats(self.model, ctypes.byref(st)) != 0:
            raise RippleError("ripple pack is not attached")
        d = {n: (float if t is ctypes.c_double else int)(getattr(st, n)) for n, t in c.stats._fields_}
        d["error"] = bool(d["error"])
        d["direct_io"] = bool(d["direct_io"])
        d["all_active"] = bool(d["all_active"])
        d["stream_dense"] = bool(d["stream_dense"])
        d["mode"] = "sparse"  # the runtime is attached (stream_dense: computing every neuron, streamed)
        lookups = d["cache_hits"] + d["cache_misses"]
        d["cache_hit_rate"] = d["cache_hits"] / lookups if lookups else 0.0
        d["predicted_density"] = d["active_neurons"] / d["total_neurons"] if d["total_neurons"] else 0.0
        d["reads_per_token"] = d["reads"] / d["tokens"] if d["tokens"] else 0.0
        d["bytes_per_token"] = d["bytes_read"] / d["tokens"] if d["tokens"] else 0.0
        d["useful_bytes_per_token"] = d["useful_bytes"] / d["tokens"] if d["tokens"] else 0.0
        d["io_seconds_per_token"] = d["io_seconds"] / d["tokens"] if d["tokens"] else 0.0
        # io_seconds is the time plans waited for reads; read-ahead's reads ran beside the compute
        read_s = d["io_seconds"] - d["ahead_wait_seconds"] + d["ahead_seconds"]
        d["read_mbps"] = d["bytes_read"] / read_s / 1e6 if read_s > 0 else None
        d["hidden_io_seconds"] = max(0.0, d["ahead_seconds"] - d["ahead_wait_seconds"])
        d["pack"] = str(self.ripple_pack.path)
        d["non_ffn_weights"] = self.ripple_non_ffn
        return d

    def ripple_set_point(self, index: int) -> dict:
        """Move to stored operating point `index` (0 = dense; see pack.op_density) between decodes."""
        pk = self.ripple_pack
        if pk is None:
            raise RippleError("no ripple pack attached (dense mode)")
        if not 0 <= index < len(pk.op_density):
            raise RippleError(f"operating point {index} does not exist; the pack has {len(pk.op_density)}")
        if self._no_predictors and not computes_every_neuron(pk, index):
            raise RippleError(f"operating point {index} needs the predictors, which a load at the dense point leaves "
                              "out; load with stock_when_dense=False (or the CLI's --quality) to move between points")
        if index != pk.op_default or self.ripple_point is not None:
            self.ripple_set_selection(pk.op_thresholds[index] + np.float32(self._threshold_offset), pk.op_floor[index])
        # which computation runs it: the GGUF's own FFN tensors streamed (a dense point) or the pack's bundles
        self.ripple_point = {**_point_info(pk, index), "path": "stream" if self._streamed else "pack"}
        return self.ripple_point

    def ripple_set_selection(self, thresholds, floor: float) -> None:
        """Per-layer predictor thresholds and the per-token floor share (every token computes at least
        its top ceil(floor * n_ff) neurons by score), between decodes. ripple_set_point uses the pack's
        stored pairs; thresholds out of reach with floor d force exactly the top-d (bench scale)."""
        lib = ripple_lib()
        if not hasattr(lib, "llama_ripple_set_floor"):
            raise RippleError("this llama-cpp-python build cannot change operating points; run tools/setup.sh")
        thr = np.ascontiguousarray(thresholds, dtype=np.float32)
        if (lib.llama_ripple_set_thresholds(self.model, thr.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), len(thr)) != 0
                or lib.llama_ripple_set_floor(self.model, float(floor)) != 0):
            raise RippleError("the runtime refused the thresholds or the floor")

    def ripple_reset_stats(self) -> None:
        if self.ripple_active:
            ripple_lib().llama_ripple_reset_stats(self.model)

    def ripple_trace(self, enable: bool | None = None) -> list[tuple[int, int]]:
        """With enable=True/False: start (clearing) / stop recording reads. Returns the (offset,
        length) of every read syscall recorded so far."""
        if not self.ripple_active:
            return []
        lib = ripple_lib()
        if enable is not None:
            lib.llama_ripple_set_trace(self.model, bool(enable))
        n = lib.llama_ripple_get_trace(self.model, None, None, 0)
        offs, lens = (ctypes.c_uint64 * max(n, 1))(), (ctypes.c_uint64 * max(n, 1))()
        n = lib.llama_ripple_get_trace(self.model, offs, lens, n)
        return [(int(offs[i]), int(lens[i])) for i in range(n)]


__all__ = ["RippleLlama", "RippleOptions", "parse_size", "budget_bytes", "ripple_lib", "verified_pack", "pack_path_for"]
