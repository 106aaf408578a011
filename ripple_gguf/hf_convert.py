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
from pathlib import Path

from .errors import RippleError

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def converter_dir() -> Path:
    """Where tools/setup.sh put convert_hf_to_gguf.py and conversion/ (overridable for dev)."""
    d = Path(os.environ.get("RIPPLE_LLAMA_CPP_CONVERT", Path(sys.prefix) / "share/ripple-gguf/llama.cpp"))
    if not (d / "conversion" / "__init__.py").is_file():
        raise RippleError(f"llama.cpp's converter is not installed at {d}; run tools/setup.sh")
    return d


def resolve_source(src: str) -> Path:
    """A local directory, or a hub repo id resolved through huggingface_hub's cache (then the hub)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise RippleError(f"{src} is a file; pass the checkpoint directory (with config.json)")
    if not _REPO_ID.match(src):
        raise RippleError(f"{src}: no such directory, and not a Hugging Face repo id (org/name)")
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
    """Convert with llama.cpp's converter. outtype: 'f32' or 'f16' (quantization happens later,
    after the neurons are permuted)."""
    sys.path.insert(0, str(converter_dir()))
    import gguf
    import torch
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
    logging.getLogger("hf-to-gguf").setLevel(logging.WARNING)
    logging.getLogger("gguf").setLevel(logging.WARNING)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}[outtype]
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
