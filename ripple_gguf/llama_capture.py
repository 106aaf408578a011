"""Run a GGUF through llama.cpp (llama-cpp-python's low-level API) and observe FFN tensors.

Profiling goes through llama.cpp itself, not transformers, so it works for every architecture
llama.cpp runs, needs no HF checkpoint (`ripple-gguf pack`/`inspect --text` on a GGUF alone), and
sees exactly the numbers the runtime will see. The graph-eval callback (`cb_eval`) hands us named
nodes: `ffn_norm-N` (what the FFN sees) and the FFN intermediate that feeds ffn_down
(`ffn_swiglu-N`, `ffn_sqr(relu)-N`, ...); the last such node of a layer in graph order is the one.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import llama_cpp
from llama_cpp._logger import set_verbose

from .cpus import idle_cores
from .errors import RippleError
from .interrupt import deferred

# Nodes that can feed ffn_down, by FFN family (src/llama-graph.cpp, build_ffn).
ZERO_ACTIVATIONS = ("ffn_sqr(relu)", "ffn_relu", "ffn_reglu")       # true zeros: active = != 0
DENSE_ACTIVATIONS = ("ffn_swiglu", "ffn_swiglu_limited", "ffn_geglu", "ffn_gelu", "ffn_silu",
                     "ffn_gate_par")                                  # no zeros: magnitude threshold
INTERMEDIATE_NAMES = ZERO_ACTIVATIONS + DENSE_ACTIVATIONS
FFN_INPUT_NAME = "ffn_norm"
FFN_GATE_NAME = "ffn_gate"    # gate pre-activation (gated FFNs): what a gate-only (CATS) rule ranks by
FFN_OUTPUT_NAME = "ffn_out"   # after ffn_down: once the last layer's is done, nothing else is needed
GGML_TYPE_F32 = 0


class GgmlTensor(ctypes.Structure):
    """struct ggml_tensor of the pinned ggml (ggml/include/ggml.h); only read, never written."""
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def _split_name(name: str) -> tuple[str, int]:
    base, _, il = name.rpartition("-")
    return (base, int(il)) if il.isdigit() else (name, -1)


class LlamaRunner:
    """One model + one context; `evaluate(tokens)` returns logits and the captured FFN tensors."""

    def __init__(self, path: str | Path, n_ctx: int = 512, n_threads: int | None = None,
                 capture_inputs: bool = False, capture_intermediate: bool = True, n_seq: int = 1,
                 ffn_mask=None, capture_gate: bool = False):
        """n_ctx: tokens per sequence; n_seq > 1 gives each of that many sequences its own KV
        stream (batched generation, `step`). ffn_mask(layer, x, gate, h) -> bool (tokens, n_ff) or
        None: neurons outside the mask are zeroed before ffn_down, inside llama.cpp's own graph
        (how quality.py measures the perplexity of a selection rule on the stock model)."""
        set_verbose(False)
        llama_cpp.llama_backend_init()
        self.path = str(path)
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        with deferred():
            self.model = llama_cpp.llama_model_load_from_file(self.path.encode(), mparams)
        if not self.model:
            raise RippleError(f"{path}: llama.cpp could not load this GGUF; is it a complete model file?")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_layer = llama_cpp.llama_model_n_layer(self.model)
        self.n_ctx = n_ctx
        wanted = set()
        if capture_intermediate:
            wanted.update(INTERMEDIATE_NAMES)
        if capture_inputs or ffn_mask is not None:
            wanted.add(FFN_INPUT_NAME)
        if capture_gate:
            wanted.add(FFN_GATE_NAME)
        self._wanted = wanted
        self.ffn_mask = ffn_mask
        self._stop_early = self._stopped = False
        self._captured: dict[tuple[str, int], np.ndarray] = {}
        self._cb = llama_cpp.ggml_backend_sched_eval_callback(self._on_node)  # keep a reference
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx * n_seq
        cparams.n_batch = cparams.n_ubatch = max(n_ctx, n_seq)
        cparams.n_seq_max = n_seq
        cparams.kv_unified = False  # per-sequence streams: attention only over a token's own sequence
        self.n_seq = n_seq
        threads = n_threads or idle_cores()
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        if wanted:
            cparams.cb_eval = self._cb
        with deferred():
            self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise RippleError(f"{path}: llama.cpp could not create a context (out of memory?)")
        self.batch = llama_cpp.llama_batch_init(max(n_ctx, n_seq), 0, 1)

    def _on_node(self, t_ptr, ask, _user) -> bool:
        # An exception cannot cross the C frames of llama_decode: keep it (Ctrl-C included), abort
        # the graph, and re-raise it once llama_decode returns.
        try:
            return self._observe(t_ptr, ask)
        except BaseException as e:  # noqa: BLE001
            self._pending = e
            return False

    def _observe(self, t_ptr, ask) -> bool:
        t = ctypes.cast(t_ptr, ctypes.POINTER(GgmlTensor)).contents
        base, il = _split_name(t.name.decode(errors="replace"))
        stop = self._stop_early and base == FFN_OUTPUT_NAME and il == self.n_layer - 1
        if ask:
            return base in self._wanted or stop
        if stop:
            # the last layer's FFN is done: returning False ends the graph here (ggml-backend's
            # scheduler breaks out of the split), skipping the output norm and the vocabulary
            # matmul over every position (a fifth of the work on SmolLM2); the logits are unused
            self._stopped = True
            return False
        if base not in self._wanted or t.type != GGML_TYPE_F32:
            return True
        ne0, ne1 = int(t.ne[0]), int(t.ne[1])
        if int(t.nb[1]) != ne0 * 4 or t.ne[2] != 1 or t.ne[3] != 1:
            return True  # not a plain 2-D f32 tensor; nothing we know how to read
        buf = (ctypes.c_float * (ne0 * ne1)).from_address(t.data)
        live = np.ctypeslib.as_array(buf).reshape(ne1, ne0)
        arr = live.copy()
        kind = {FFN_INPUT_NAME: "input", FFN_GATE_NAME: "gate"}.get(base, "act")
        if kind == "act" and self.ffn_mask is not None:
            # the scheduler stops after an observed node and goes on from its memory: zeroing
            # here is what ffn_down then multiplies
            keep = self.ffn_mask(il, self._captured.get(("input", il)), self._captured.get(("gate", il)), arr)
            if keep is not None:
                arr *= keep
                live[:] = arr
        # graph order: a later node of the same layer (sqr after relu) supersedes an earlier one
        self._captured[(kind, il)] = arr
        self._act_names[il] = base if kind == "act" else self._act_names.get(il)
        return True

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        data = text.encode("utf-8", errors="replace")
        n_max = len(data) + 16
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_bos, False)
        if n < 0:
            raise RippleError("tokenization overflowed; text is malformed")
        return list(buf[:n])

    @property
    def bos(self) -> int:
        return int(llama_cpp.llama_vocab_bos(self.vocab))

    def evaluate(self, tokens: list[int], want_logits: bool = False, logits_from: int = 0):
        """Decode one fresh sequence. Positions from `logits_from` on are outputs (the logits of
        positions logits_from..n-1 when want_logits); by default all are, so the last layer's FFN
        runs for all tokens (llama.cpp prunes non-output rows before it: the last layer's captures
        then hold the output rows only). Returns (logits or None, {("act"|"input", layer):
        (rows, width) array}, {layer: act node name})."""
        n = len(tokens)
        if not 0 < n <= self.n_ctx:
            raise ValueError(f"chunk of {n} tokens does not fit n_ctx={self.n_ctx}")
        if not 0 <= logits_from < n:
            raise ValueError(f"logits_from {logits_from} outside a chunk of {n} tokens")
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        return self._decode(tokens, range(n), [0] * n, want_logits, logits_from)

    def step(self, tokens: list[int], positions: list[int], seqs: list[int]):
        """One batched step: token i at position positions[i] of sequence seqs[i] (one token per
        sequence, continuing its KV). Returns (logits (n, n_vocab), captured, names) like evaluate."""
        return self._decode(tokens, positions, seqs, True)

    def clear_seq(self, seq: int) -> None:
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.ctx), seq, -1, -1)

    def _decode(self, tokens, positions, seqs, want_logits: bool, logits_from: int = 0):
        n = len(tokens)
        b = self.batch
        b.n_tokens = n
        for i, (tok, pos, seq) in enumerate(zip(tokens, positions, seqs)):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = int(i >= logits_from)
        self._captured, self._act_names, self._pending = {}, {}, None
        self._stop_early, self._stopped = bool(self._wanted) and not want_logits, False
        with deferred():
            rc = llama_cpp.llama_decode(self.ctx, b)
        if self._pending is not None:
            raise self._pending
        if rc != 0:
            raise RippleError(f"llama.cpp failed to evaluate a batch (llama_decode returned {rc})")
        logits = None
        if want_logits:
            ptr = llama_cpp.llama_get_logits(self.ctx)
            n_out = n - logits_from
            logits = np.ctypeslib.as_array(ptr, shape=(n_out * self.n_vocab,)).reshape(n_out, self.n_vocab).copy()
        return logits, self._captured, dict(self._act_names)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            llama_cpp.llama_batch_free(self.batch)
            llama_cpp.llama_free(self.ctx)
            llama_cpp.llama_model_free(self.model)
            self.ctx = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
