"""Deterministic text for the fixture models: the running interpreter's Python standard library.

Every source file goes to exactly one split, chosen by a stable hash of its path relative to the
stdlib root (~90% train, ~5% calib, ~5% heldout), so calibration and held-out text never contain
code the models were trained on. `models/text/calib.txt` and `models/text/heldout.txt` are
committed; the training text (~8 MB) is regenerated at train time by tools/train_fixtures.py.

The text depends on the interpreter's stdlib version (written with CPython 3.11.7); since calib and
heldout are committed, only retraining is affected by a different interpreter.

    python tools/fixture_text.py    # rewrites models/text/{calib,heldout}.txt
"""
import hashlib
import os
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT_DIR = ROOT / "models" / "text"
# Tests and GUI code are skipped as in the brief; encodings/ (generated charmap tables) and
# pydoc_data/ (750 KB of prose in one string) are skipped because they are data, not code.
SKIP_DIRS = {"test", "tests", "idlelib", "tkinter", "site-packages", "encodings", "pydoc_data", "__pycache__"}
TARGET_CHARS = {"calib": 120_000, "heldout": 60_000}
CHUNK_CHARS = {"calib": 9_000, "heldout": 3_500}  # per-file cap, so the text spans many files


def stdlib_files(stdlib=None):
    """Sorted relative paths (posix) of the stdlib .py files we use."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for f in filenames:
            if f.endswith(".py"):
                out.append((Path(dirpath) / f).relative_to(stdlib).as_posix())
    return sorted(out)


def split_of(relpath):
    """'train' | 'calib' | 'heldout', from a hash of the path (stable across runs and machines)."""
    h = int(hashlib.sha256(relpath.encode()).hexdigest(), 16) % 100
    return "train" if h < 90 else "calib" if h < 95 else "heldout"


def read(relpath, stdlib=None):
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    # a couple of stdlib files are latin-1 or have stray bytes; never fail on them
    return (stdlib / relpath).read_text(encoding="utf-8", errors="replace")


def documents(split, stdlib=None):
    """(relpath, full file text) for every file of a split, in sorted path order."""
    return [(p, read(p, stdlib)) for p in stdlib_files(stdlib) if split_of(p) == split]


def excerpt(text, cap):
    """Whole lines, starting at the first top-level def/class (function bodies are more
    representative of what the model computes on than license headers and imports), <= cap chars."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.startswith(("def ", "class "))), 0)
    out, n = [], 0
    for line in lines[start:]:
        if n + len(line) > cap:
            break
        out.append(line)
        n += len(line)
    return "".join(out)


def sample_text(split, stdlib=None):
    """Calibration / held-out text: a file header comment plus an excerpt of each file of the
    split in sorted order, until the split's target size is reached."""
    parts, n = [], 0
    for rel, text in documents(split, stdlib):
        body = excerpt(text, CHUNK_CHARS[split])
        if not body.strip():
            continue
        part = doc_text(rel, body)
        parts.append(part)
        n += len(part)
        if n >= TARGET_CHARS[split]:
            break
    return "".join(parts)


def doc_text(rel, text):
    """One file as a document: the same header comment as in calib/heldout, then the code."""
    return f"# ---- {rel} ----\n{text.rstrip()}\n\n"


def train_text(stdlib=None):
    """All training files, whole, concatenated."""
    return "".join(doc_text(rel, text) for rel, text in documents("train", stdlib))


if __name__ == "__main__":
    TEXT_DIR.mkdir(parents=True, exist_ok=True)
    files = stdlib_files()
    for split in ("calib", "heldout"):
        text = sample_text(split)
        (TEXT_DIR / f"{split}.txt").write_text(text, encoding="utf-8")
        nfiles = text.count("# ---- ")
        print(f"{split}: {len(text.encode())} bytes from {nfiles} files -> {TEXT_DIR / (split + '.txt')}")
    counts = {s: sum(split_of(p) == s for p in files) for s in ("train", "calib", "heldout")}
    print(f"files per split: {counts} (of {len(files)})")
