"""HF checkpoint -> plain GGUF through llama.cpp's own converter (pinned with the wheel we build).

Tensor naming, tokenizer, chat template and per-architecture quirks are llama.cpp's job; we only
locate the checkpoint, check it is readable, and call the converter in-process.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import RippleError
from .gguf_header import GGUF_MAGIC

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def converter_dir() -> Path:
    """Where tools/setup.sh put convert_hf_to_gguf.py and conversion/ (overridable for dev)."""
    d = Path(os.environ.get("RIPPLE_LLAMA_CPP_CONVERT", Path(sys.prefix) / "share/ripple-gguf/llama.cpp"))
    if not (d / "conversion" / "__init__.py").is_file():
        raise RippleError(f"llama.cpp's converter is not installed at {d}; run tools/setup.sh")
    return d


@dataclass
class Source:
    kind: str      # "gguf" (an existing GGUF, converted as it is) or "hf" (a checkpoint directory)
    path: Path
    label: str     # what the user named, for messages and `ripple.source`


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def resolve_source(src: str, file: str | None = None) -> Source:
    """SRC as the user gave it: a local .gguf (recognised by its magic), a local checkpoint
    directory, a hub repo id (a checkpoint), or a hub repo id plus a GGUF file name or quant tag
    (`owner/repo:file.gguf`, `owner/repo file.gguf`, `owner/repo:Q4_K_M`, like llama.cpp's -hf);
    hub files come through huggingface_hub's cache (offline: only what is cached)."""
    path = Path(src).expanduser()
    if file is None and path.is_file():
        if not is_gguf(path):
            raise RippleError(f"{src} is not a GGUF file (no GGUF magic) and not a checkpoint directory; "
                              "pass a .gguf file or a Hugging Face checkpoint directory")
        return Source("gguf", path, path.name)
    if file is not None and path.is_dir():
        return resolve_source(str(path / file))
    if file is None and path.is_dir():
        return Source("hf", path, str(path))
    repo, _, name = src.partition(":")
    name = file or name
    if not _REPO_ID.match(repo):
        raise RippleError(f"{src}: no such file or directory, and not a Hugging Face repo id (owner/name)")
    if name:
        p = _hub_gguf(repo, name)
        if not is_gguf(p):
            raise RippleError(f"{repo}/{p.name} is not a GGUF file (no GGUF magic); pass a .gguf file of that repo")
        return Source("gguf", p, f"{repo}/{p.name}")
    return Source("hf", _hub_checkpoint(repo), repo)


def _hub_checkpoint(src: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.py"]
    try:
        return Path(snapshot_download(src, allow_patterns=patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    try:
        return Path(snapshot_download(src, allow_patterns=patterns))
    except Exception as e:
        raise RippleError(f"model {src!r} is not in the local Hugging Face cache and could not be downloaded "
                          f"({type(e).__name__}); run `huggingface-cli download {src}` where the hub is "
                          "reachable, or pass a local directory") from None


def _hub_gguf(repo: str, name: str) -> Path:
    """One GGUF of a hub repo: an exact file name, or a quant tag matched against the names."""
    from huggingface_hub import hf_hub_download, list_repo_files
    fix = (f"run `huggingface-cli download {repo} {name if name.lower().endswith('.gguf') else '--include *' + name + '*.gguf'}` "
           "where the hub is reachable, or pass a local .gguf file")
    if not name.lower().endswith(".gguf"):  # a quant tag: pick the file whose name carries it
        files = _cached_ggufs(repo)
        if not any(name.lower() in Path(f).name.lower() for f in files):
            try:
                files = list_repo_files(repo)
            except Exception as e:
                raise RippleError(f"no GGUF tagged {name!r} of {repo} in the local Hugging Face cache, and the hub "
                                  f"could not be reached ({type(e).__name__}); {fix}") from None
        hits = sorted(f for f in files if f.lower().endswith(".gguf") and name.lower() in Path(f).name.lower()
                      and "mmproj" not in f.lower())
        if not hits:
            raise RippleError(f"{repo} has no GGUF file whose name contains {name!r}; pass a file name "
                              f"(`{repo}:FILE.gguf`)")
        name = hits[0]
    try:
        return Path(hf_hub_download(repo, name, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(hf_hub_download(repo, name))
    except Exception as e:
        raise RippleError(f"{repo}:{name} is not in the local Hugging Face cache and could not be downloaded "
                          f"({type(e).__name__}); {fix}") from None


def _cached_ggufs(repo: str) -> list[str]:
    """GGUF files of `repo` already in the huggingface_hub cache (any revision)."""
    try:
        from huggingface_hub import scan_cache_dir
        for r in scan_cache_dir().repos:
            if r.repo_id == repo and r.repo_type == "model":
                return sorted({str(f.file_path.relative_to(rev.snapshot_path))
                               for rev in r.revisions for f in rev.files if f.file_name.lower().endswith(".gguf")})
    except Exception:
        pass
    return []


def check_checkpoint(model_dir: Path) -> str:
    """Fail early and clearly on what would otherwise be a deep traceback. Returns the HF arch."""
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise RippleError(f"{model_dir}: no config.json; pass a Hugging Face checkpoint directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RippleError(f"{cfg_path}: invalid JSON ({e}); re-download the checkpoint") from None
    archs = cfg.get("architectures") or []
    if not archs:
        raise RippleError(f"{cfg_path}: no 'architectures' entry; cannot tell which model this is")
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights and not sorted(model_dir.glob("pytorch_model*.bin")):
        raise RippleError(f"{model_dir}: no *.safetensors weights found; re-download the checkpoint")
    from safetensors import safe_open
    for w in weights:
        try:
            with safe_open(str(w), framework="pt") as f:
                names = list(f.keys())
                if names:
                    f.get_slice(names[-1])  # header offsets checked against the file size
        except Exception as e:
            raise RippleError(f"{w}: corrupt or truncated safetensors file ({str(e).splitlines()[0]}); "
                              "re-download the checkpoint") from None
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        missing = {v for v in json.loads(index.read_text()).get("weight_map", {}).values()} - {w.name for w in weights}
        if missing:
            raise RippleError(f"{model_dir}: missing weight shard(s) {', '.join(sorted(missing))}; re-download the checkpoint")
    arch = archs[0]
    sys.path.insert(0, str(converter_dir()))
    from conversion import TEXT_MODEL_MAP  # noqa: E402  (llama.cpp's registry of HF architectures)
    if arch not in TEXT_MODEL_MAP:
        raise RippleError(f"unsupported architecture {arch!r}: llama.cpp's converter does not know it")
    return arch


def hf_to_gguf(model_dir: Path, out: Path, outtype: str) -> None:
    """Convert with llama.cpp's converter. outtype: 'f32', 'f16' or 'bf16' (quantization happens
    later, by llama.cpp's quantizer, after the index is added)."""
    sys.path.insert(0, str(converter_dir()))
    import gguf
    import torch
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
    logging.getLogger("hf-to-gguf").setLevel(logging.WARNING)
    logging.getLogger("gguf").setLevel(logging.WARNING)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16}[outtype]
    with torch.inference_mode():
        hparams = ModelBase.load_hparams(model_dir, False)
        arch = get_model_architecture(hparams, ModelType.TEXT)
        try:
            cls = get_model_class(arch)
        except NotImplementedError:
            raise RippleError(f"unsupported architecture {arch!r}: llama.cpp's converter does not know it") from None
        try:
            model = cls(model_dir, ftype, out)
            model.write()
        except (KeyboardInterrupt, RippleError):
            raise
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RippleError(f"llama.cpp's converter failed on {model_dir}: {msg}") from None
