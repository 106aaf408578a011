"""llama.cpp's own model quantizer (`llama_model_quantize`, bound in llama-cpp-python): the K-quant
mixes (q4_k_m, ...) pick per-tensor types exactly as `llama-quantize` does, and every KV key (the
`ripple.*` index included) is copied through."""
from __future__ import annotations

import ctypes
import threading
from pathlib import Path

from tqdm import tqdm

from .cpus import usable_cpus
from .errors import RippleError

# enum llama_ftype (include/llama.h of the pinned llama.cpp)
FTYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10,
          "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16,
          "q5_k_m": 17, "q6_k": 18, "iq4_nl": 25, "iq4_xs": 30, "bf16": 32}
# rough output bytes per input f16 byte, for the progress bar only
_BITS = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.7, "q5_k_s": 5.5,
         "q5_1": 6, "q5_0": 5.5, "q4_k_m": 4.9, "q4_k_s": 4.6, "q4_1": 5, "q4_0": 4.5, "iq4_nl": 4.5,
         "iq4_xs": 4.3, "q3_k_l": 4.3, "q3_k_m": 3.9, "q3_k_s": 3.5, "q2_k": 3.4}


def quantize_gguf(src: Path, dst: Path, ftype: str, allow_requantize: bool = False, desc: str | None = None) -> None:
    """Write `dst` = `src` quantized to the llama.cpp file type `ftype` (e.g. "q4_k_m")."""
    import llama_cpp
    from llama_cpp._logger import set_verbose
    set_verbose(False)  # llama.cpp logs every tensor at INFO; errors still reach stderr
    if ftype not in FTYPES:
        raise RippleError(f"unknown quantization {ftype!r}; choose one of {', '.join(FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = usable_cpus()
    params.allow_requantize = allow_requantize
    result = {}
    # a daemon thread, so Ctrl-C in the main thread can end the process while llama.cpp is busy
    worker = threading.Thread(target=lambda: result.setdefault(
        "rc", llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))),
        daemon=True)
    expected = int(Path(src).stat().st_size * _BITS.get(ftype, 8) / 16)
    with tqdm(total=expected, desc=desc or f"quantizing to {ftype}", unit="B", unit_scale=True, leave=False) as bar:
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
            size = Path(dst).stat().st_size if Path(dst).exists() else 0
            bar.update(max(0, min(size, expected) - bar.n))
    if result.get("rc") != 0:
        raise RippleError(f"llama.cpp's quantizer failed to write {ftype} (code {result.get('rc')}); "
                          "see its log above; q8_0/q4_0 need n_embd and n_ff multiples of 32")
