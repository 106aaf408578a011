"""Where calibration tokens come from: the user's text files, or text the model writes itself."""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from .errors import RippleError
from .interrupt import deferred

MIN_CALIB_TOKENS = 256


def read_text_files(paths: list[str | Path], what: str = "calibration") -> str:
    """Read and concatenate UTF-8 text files; empty or unreadable ones are a clear error."""
    parts = []
    for p in map(Path, paths):
        if not p.is_file():
            raise RippleError(f"{what} file {p} does not exist; pass a UTF-8 text file")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise RippleError(f"{what} file {p} is not UTF-8 text; convert it or pass another file") from None
        if not text.strip():
            raise RippleError(f"{what} file {p} is empty; pass a file with real text "
                              f"(at least ~{MIN_CALIB_TOKENS} tokens)")
        parts.append(text)
    return "\n\n".join(parts)


def self_generated_tokens(model_path: Path, n_tokens: int, n_ctx: int, seed: int = 0) -> list[int]:
    """Sample text from the model itself (temperature 0.8 from BOS): calibration that needs no data
    at all, for fully offline conversion. Real text from the target domain is better (--calib)."""
    from llama_cpp import Llama
    with deferred():
        llm = Llama(str(model_path), n_ctx=n_ctx, n_threads=None, seed=seed, verbose=False)
    bos, eos = llm.token_bos(), llm.token_eos()
    out: list[int] = []
    bar = tqdm(total=n_tokens, desc="generating calibration text", unit="tok", leave=False)
    seq_len = max(32, n_ctx - 2)
    try:
        while len(out) < n_tokens:
            seq = []
            gen = llm.generate([bos], temp=0.8, top_k=40, top_p=0.95, reset=True)
            while len(seq) < seq_len:
                with deferred():
                    tok = next(gen, eos)
                if tok == eos:
                    break
                seq.append(tok)
            if not seq:  # the model ended at once; try another sample
                seq = [bos]
            out.extend(seq)
            bar.update(len(seq))
    finally:
        bar.close()
        llm.close()
    return out[:n_tokens]
