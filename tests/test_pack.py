"""Offload pack: bundles equal the GGUF's FFN rows/columns, predictors meet their target on unseen
text, and a pack that does not belong to its GGUF is refused, never read."""
from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
from gguf import GGUFReader

from ripple_gguf.errors import RippleError
from ripple_gguf.pack import PACK_ALIGN, open_pack, pack_path_for

from conftest import CALIB, FIXTURES, HELDOUT, run_cli

# Relative RMS error of the re-quantized down columns vs the GGUF's own (dequantized) ffn_down,
# as stated in README/FORMAT.md; measured 0.52% (Q8_0) and 7.6% (Q4_0) on the fixtures.
DOWN_REQUANT_RMS = {"F32": 0.0, "F16": 0.0, "Q8_0": 0.01, "Q4_0": 0.09}


def ffn(reader, il, kind):
    t = next(t for t in reader.tensors if t.name == f"blk.{il}.{kind}.weight")
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)


@pytest.mark.parametrize("model", FIXTURES)
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0", "q4_0"])
def test_bundles_round_trip_to_gguf_tensors(converted, model, outtype):
    path = converted(model, outtype)
    pk = open_pack(path)
    reader = GGUFReader(path)
    rng = np.random.default_rng(0)
    down_type = {"q4_0": "Q8_0"}.get(outtype, outtype.upper())  # down rows are at least Q8_0 by default
    assert [{k: t.name for k, t in p.items()} for p in pk.part_types] == \
        [{"gate": outtype.upper(), "up": outtype.upper(), "down": down_type} if pk.has_gate else
         {"up": outtype.upper(), "down": down_type}] * pk.n_layer
    for il in range(pk.n_layer):
        assert pk.bundle_offsets[il] % PACK_ALIGN == 0
        n = pk.n_ff[il]
        starts = np.sort(rng.choice(n - 8, 5, replace=False))
        runs = [(int(s), int(rng.integers(1, 8))) for s in starts]
        got = pk.read_runs(il, runs)
        idx = pk.orders[il][np.concatenate([np.arange(s, s + c) for s, c in runs])]  # record p: neuron order[p]
        np.testing.assert_array_equal(got["up"], ffn(reader, il, "ffn_up")[idx])
        if pk.has_gate:
            np.testing.assert_array_equal(got["gate"], ffn(reader, il, "ffn_gate")[idx])
        down = ffn(reader, il, "ffn_down")[:, idx].T
        err = np.sqrt(((got["down"] - down) ** 2).mean() / (down ** 2).mean())
        assert err <= DOWN_REQUANT_RMS[down_type], err
        # the pack states its own error (over the whole layer); a sample of 5 runs lands near it
        assert pk.down_rel_rms[il] <= DOWN_REQUANT_RMS[down_type]
        assert (pk.down_rel_rms[il] == 0) == (err == 0)


@pytest.mark.parametrize("model", FIXTURES)
def test_inspect_reports_pack_and_predictor_on_unseen_text(converted, model):
    path = converted(model, "f16")
    info = json.loads(run_cli("inspect", path, "--text", HELDOUT, "--json", check=True).stdout)
    pk = info["ripple"]["pack"]
    assert pk["status"] == "bound to this GGUF"
    assert pk["bundle_bytes"] > 0 and 0 < pk["predictor_vs_ffn"] < 0.15
    ev = pk["on_text"]
    assert ev["text"] == HELDOUT.name
    text = run_cli("inspect", path, "--text", HELDOUT, check=True).stdout
    assert "offload pack" in text and "bytes per neuron bundle" in text
    on_text = text[text.index(f"predictor per layer on {HELDOUT.name}"):].splitlines()[1:1 + len(ev["recall"])]
    assert "operating points" in text and "<- default" in text
    ops, default = pk["operating_points"], pk["default_point"]
    assert ops[0] == {"density": 1.0, "ppl_increase": 0.0, "read_share": 1.0, "every_neuron": True}
    assert all(a["density"] > b["density"] for a, b in zip(ops, ops[1:]))
    # the pack reads at least the active records' bytes, and no more than every record
    assert all(o["density"] - 1e-3 <= o["read_share"] <= 1.0 for o in ops)
    assert all(o["every_neuron"] == (o["density"] >= 0.7 or o["read_share"] >= 0.9) for o in ops)
    assert all(o["ppl_increase"] <= pk["max_ppl_increase"] for o in ops[1:default + 1])
    for il, (mr, pd, td) in enumerate(zip(ev["mass_recall"], ev["pred_density"], ev["true_density"])):
        print(f"{model} layer {il}: mass recall {mr:.3f}, recall {ev['recall'][il]:.3f}, "
              f"precision {ev['precision'][il]:.3f}, predicted density {pd:.3f} vs true {td:.3f}")
        # a layer that reads more than twice the neurons that are truly active must say so
        assert (pd <= 2 * td) == ("misses" not in on_text[il]), on_text[il]


@pytest.mark.parametrize("ftype", ["q4_k_m", "q4_1", "iq4_nl"])
def test_mixed_type_pack_holds_each_part_in_its_own_type(converted, tmp_path, ftype):
    """A llama.cpp K-quant mix (gate/up fall back to Q5_0 at n_embd 128, down Q4_K/Q6_K by layer) and
    other types: gate/up records are the GGUF's rows byte for byte; down rows are re-quantized in
    the down type or llama.cpp's fallback for a 128-long row, within the error the pack states."""
    from ripple_gguf import ggml_quant
    from ripple_gguf.llama_quantize import quantize_gguf
    from ripple_gguf.pack import pack_down_type
    g = tmp_path / f"m-{ftype}.gguf"
    quantize_gguf(converted("tiny-llama-swiglu", "f16"), g, ftype)  # copies the ripple.* index
    run_cli("pack", g, "--calib", CALIB, "--calib-tokens", 4096, check=True)
    pk = open_pack(g)
    reader = GGUFReader(g)
    types = {t.name: t.tensor_type for t in reader.tensors}
    for il in range(pk.n_layer):
        parts = pk.part_types[il]
        assert parts["up"] == types[f"blk.{il}.ffn_up.weight"] and parts["gate"] == types[f"blk.{il}.ffn_gate.weight"]
        src = types[f"blk.{il}.ffn_down.weight"]
        assert pk.down_source_type[il] == src and parts["down"] == pack_down_type(src, pk.n_embd, "auto")
        assert ggml_quant.block_size(parts["down"]) <= 32 or ggml_quant.block_size(parts["down"]) == 1  # fits n_embd 128
        got = pk.read_runs(il, [(0, pk.n_ff[il])])
        order = pk.orders[il]
        np.testing.assert_array_equal(got["up"], ffn(reader, il, "ffn_up")[order])
        np.testing.assert_array_equal(got["gate"], ffn(reader, il, "ffn_gate")[order])
        down = ffn(reader, il, "ffn_down")[:, order].T
        err = ggml_quant.relative_rms(down, got["down"])
        assert abs(err - pk.down_rel_rms[il]) < 1e-4 and 0 < err < 0.012, (il, parts, err)  # Q8_0 by default
    if ftype == "q4_k_m":
        assert len({q for t in pk.part_types for q in t.values()}) > 1  # really a mix
        print(f"q4_k_m fixture pack: {pk.type_label}; down rel RMS {np.round(pk.down_rel_rms, 4).tolist()}")


def copy_converted(src, tmp_path, with_pack=True):
    """A private copy of a converted GGUF (and its pack) that a test may damage."""
    g = tmp_path / "m.gguf"
    shutil.copy(src, g)
    if with_pack:
        shutil.copy(pack_path_for(src), pack_path_for(g))
    return g


def test_pack_of_another_gguf_is_refused(converted, tmp_path):
    a = converted("tiny-llama-swiglu", "f16")
    b = converted("tiny-llama-swiglu", "q8_0")
    gguf_copy = tmp_path / "m.gguf"
    shutil.copy(a, gguf_copy)
    shutil.copy(pack_path_for(b), pack_path_for(gguf_copy))  # a pack built for another file
    with pytest.raises(RippleError, match="different GGUF.*ripple-gguf pack"):
        open_pack(gguf_copy)
    proc = run_cli("inspect", gguf_copy)
    assert proc.returncode == 0 and "unusable" in proc.stdout


def test_truncated_pack_is_refused(converted, tmp_path):
    src = converted("tiny-arcee-relu2", "f16")
    g = copy_converted(src, tmp_path, with_pack=False)
    data = pack_path_for(src).read_bytes()
    pack_path_for(g).write_bytes(data[: len(data) - 5000])
    with pytest.raises(RippleError, match="truncated.*ripple-gguf pack"):
        open_pack(g)


def test_other_format_version_is_refused(converted, tmp_path):
    g = copy_converted(converted("tiny-arcee-relu2", "f16"), tmp_path)
    r = GGUFReader(pack_path_for(g), "r+")
    f = r.get_field("ripple.pack.format_version")
    f.parts[f.data[0]][0] = 99
    r.data.flush()
    del r
    with pytest.raises(RippleError, match="header is damaged.*ripple-gguf pack"):  # an edit is damage ...
        open_pack(g)
    reseal(pack_path_for(g))
    with pytest.raises(RippleError, match="pack format 99.*ripple-gguf pack"):  # ... a future writer is not
        open_pack(g)


def reseal(pack) -> None:
    """Recompute a pack's header checksum after a deliberate header edit."""
    from ripple_gguf.gguf_header import GGUFHeader
    from ripple_gguf.pack import HEADER_SUM, header_sum
    h = GGUFHeader(pack)
    t = next(t for t in h.tensors if t.name == HEADER_SUM)
    with open(pack, "r+b") as f:
        f.seek(t.data_offset)
        f.write(np.array([header_sum(pack, h.data_start)], dtype="<u8").tobytes())


# --- checksums and `verify` -------------------------------------------------------------------------

def flip(path, offset: int, mask: int = 0x10) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def test_checksums_match_the_spec_and_verify_passes(converted):
    from ripple_gguf.checksum import record_sums, ripple_sum
    path = converted("tiny-arcee-relu2", "q8_0")
    pk = open_pack(path)
    data = pack_path_for(path).read_bytes()

    def spec(raw: bytes, tag) -> int:  # FORMAT.md, word by word
        raw += b"\0" * (-len(raw) % 4)
        w = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)] + list(tag)
        return sum(w) % 2**32 | (sum((j + 1) * x for j, x in enumerate(w)) % 2**32) << 32
    il, bb = 1, pk.layer_bundle_bytes[1]
    rec = np.frombuffer(data, np.uint8, pk.n_ff[il] * bb, pk.bundle_offsets[il]).reshape(-1, bb)
    stored = np.frombuffer(data, "<u8", pk.n_ff[il], pk.sum_offsets[il])
    assert int(stored[7]) == spec(rec[7].tobytes(), (7, il)) == ripple_sum(rec[7].tobytes(), (7, il))
    assert (record_sums(rec, 0, il) == stored).all()
    proc = run_cli("verify", path, "--json", check=True)
    r = json.loads(proc.stdout)
    assert r["ok"] and r["records"] == sum(pk.n_ff) and r["bundle_bytes_checked"] == pk.ffn_pack_bytes
    assert run_cli("verify", path).stdout.startswith("OK: ")


def test_verify_names_the_damaged_layer(converted, tmp_path):
    src = converted("tiny-llama-swiglu", "f16")
    pk = open_pack(src)
    from ripple_gguf.gguf_header import GGUFHeader
    h = GGUFHeader(pack_path_for(src))
    tensors = {t.name: t for t in h.tensors}
    cases = {  # where the damage is -> what the one-line error must say
        "bundle": (pk.bundle_offsets[2] + 5 * pk.layer_bundle_bytes[2] + 3, "layer 2 bundles are damaged"),
        "bundle sums": (pk.sum_offsets[3] + 8 * 11 + 1, "layer 3 bundles are damaged"),
        "predictor": (tensors["blk.1.pred_w2"].data_offset + 100, "layer 1 predictor"),
        "threshold KV": (h.fields["ripple.pack.pred_threshold"].end - 2, "header is damaged"),
        "tensor info": (h.fields["ripple.pack.eval.tokens"].end + 40, "header is damaged|truncated|malformed|not a"),
    }
    for what, (offset, message) in cases.items():
        (tmp_path / what.replace(" ", "_")).mkdir()
        g = copy_converted(src, tmp_path / what.replace(" ", "_"))
        flip(pack_path_for(g), offset)
        proc = run_cli("verify", g)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), (what, proc.stderr)
        import re
        assert re.search(message, lines[0]), (what, lines[0])
    # the GGUF side: a changed ripple index breaks the binding
    (tmp_path / "gguf").mkdir()
    g = copy_converted(src, tmp_path / "gguf")
    hg = GGUFHeader(g)
    flip(g, hg.fields["ripple.blk.0.act_freq"].end - 3)
    proc = run_cli("verify", g)
    assert proc.returncode == 1 and "different GGUF" in proc.stderr


def test_pack_command_rebuilds_a_bound_pack(converted, tmp_path):
    g = copy_converted(converted("tiny-arcee-relu2", "q8_0"), tmp_path, with_pack=False)
    proc = run_cli("pack", g, "--calib", CALIB, "--calib-tokens", 4096, "--json", check=True)
    summary = json.loads(proc.stdout)
    assert summary["pack"] == str(pack_path_for(g))
    pk = open_pack(g)
    assert pk.train_tokens > 3000 and len(pk.predictors) == pk.n_layer
    assert {p.name for p in tmp_path.iterdir()} == {"m.gguf", "m.ripple"}  # no temp files left


def test_pack_on_plain_gguf_is_a_clear_error(tmp_path):
    from conftest import MODELS
    from ripple_gguf.hf_convert import hf_to_gguf
    plain = tmp_path / "plain.gguf"
    hf_to_gguf(MODELS / "tiny-arcee-relu2", plain, "f16")
    proc = run_cli("pack", plain, "--calib", CALIB)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "ripple-gguf convert" in proc.stderr and not pack_path_for(plain).exists()


# --- the light header reader the load path uses ---------------------------------------------------

def binding_via_gguf_py(reader: GGUFReader) -> str:
    """The binding as packs before the header reader computed it: from gguf-py's field parts and memmap."""
    import hashlib
    h = hashlib.sha256(b"ripple-pack-binding-v1")
    ffn = []
    for t in reader.tensors:
        h.update(f"{t.name}|{int(t.tensor_type)}|{tuple(int(s) for s in t.shape)}|{int(t.data_offset)}|{int(t.n_bytes)}\n".encode())
        if ".ffn_" in t.name:
            ffn.append(t)
    for field in reader.fields.values():
        if field.name.startswith("ripple."):
            for part in field.parts:
                h.update(np.ascontiguousarray(part).tobytes())
    for t in ffn:
        lo, hi = int(t.data_offset), int(t.data_offset) + int(t.n_bytes)
        h.update(reader.data[lo:min(hi, lo + 65536)].tobytes())
        h.update(reader.data[max(lo, hi - 65536):hi].tobytes())
    return h.hexdigest()


def test_header_reader_agrees_with_gguf_py(converted):
    from ripple_gguf.gguf_header import GGUFHeader
    from ripple_gguf.gguf_io import kv, kv_array
    from ripple_gguf.pack import gguf_binding
    for path in (converted("tiny-arcee-relu2", "q8_0"), pack_path_for(converted("tiny-arcee-relu2", "q8_0"))):
        ref, hdr = GGUFReader(path), GGUFHeader(path)
        assert [(t.name, tuple(int(x) for x in t.shape), t.tensor_type, int(t.data_offset), int(t.n_bytes))
                for t in ref.tensors] == \
               [(t.name, t.shape, t.tensor_type, t.data_offset, t.n_bytes) for t in hdr.tensors]
        for name, field in ref.fields.items():
            if name.startswith("GGUF."):
                continue
            if field.types[0] == gguf.GGUFValueType.ARRAY:
                if field.types[-1] != gguf.GGUFValueType.STRING:
                    assert np.array_equal(kv_array(ref, name), kv_array(hdr, name)), name
            else:
                assert kv(ref, name) == kv(hdr, name), name
        assert binding_via_gguf_py(ref) == gguf_binding(hdr)  # existing packs still match
    t = next(t for t in hdr.tensors if t.name == "blk.0.pred_w2")
    assert np.array_equal(hdr.tensor_data(t), np.asarray(next(x for x in ref.tensors if x.name == t.name).data))


def test_header_reader_refuses_damage_with_a_clear_error(converted, tmp_path):
    """Truncated or scribbled headers give RippleError, never another exception or a huge allocation."""
    from ripple_gguf.gguf_io import open_header
    good = converted("tiny-llama-swiglu", "f16").read_bytes()
    rng = np.random.default_rng(0)
    bad = tmp_path / "bad.gguf"
    cases = [good[:n] for n in (0, 3, 8, 23, 100, 5000, len(good) // 2, len(good) - 1)]
    for _ in range(40):  # a few bytes overwritten somewhere in the metadata
        b = bytearray(good)
        at = int(rng.integers(4, 4096))
        b[at:at + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        cases.append(bytes(b))
    refused = 0
    for data in cases:
        bad.write_bytes(data)
        try:
            open_header(bad)
        except RippleError as e:
            refused += 1
            assert "\n" not in str(e) and str(bad) in str(e)
    assert refused >= 8  # every truncation at least


def test_pack_refuses_a_model_whose_perplexity_overflows(converted, tmp_path):
    """Damaged weights that keep every FFN activation finite but make the logits absurd (here the
    output norm scaled by 1e6) were a traceback (OverflowError in exp) found by the fuzz campaign;
    now a one-line error naming the problem."""
    from ripple_gguf.gguf_io import open_header
    src = converted("tiny-llama-swiglu", "f32")
    bad = tmp_path / "m.gguf"
    shutil.copy(src, bad)
    t = next(t for t in open_header(bad).tensors if t.name == "output_norm.weight")
    with open(bad, "r+b") as f:
        f.seek(t.data_offset)
        w = np.frombuffer(f.read(t.n_bytes), dtype=np.float32) * np.float32(1e6)
        f.seek(t.data_offset)
        f.write(w.tobytes())
    r = run_cli("pack", bad, "--calib", CALIB, "--calib-tokens", 2048)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "perplexity" in r.stderr
    assert not pack_path_for(bad).exists()


def test_predictors_are_checked_where_they_are_read(converted, tmp_path):
    """RippleLlama checks the pack before every load but leaves the predictors to the library, which reads
    and checks them where a point uses them: decoded to float32 by that check they were 2x their bytes,
    and a 0.5B-shaped Q8_0 on the stock path kept ~7 MiB of that, page cache a model that just fits
    lacked (0.2x stock in a cgroup of stock's own size). A damaged predictor is still an error wherever
    it would be used; a dense point, which uses none, runs."""
    from ripple_gguf.gguf_header import GGUFHeader
    from ripple_gguf.runtime import RippleLlama, verified_pack
    g = copy_converted(converted("tiny-llama-swiglu", "f16"), tmp_path)
    pred = {t.name: t for t in GGUFHeader(pack_path_for(g)).tensors}["blk.1.pred_w2"]
    flip(pack_path_for(g), int(pred.data_offset) + 100)
    pk = verified_pack(str(g))
    assert pk.predictors == [] and pk.predictor_bytes == 0
    with pytest.raises(RippleError, match="layer 1 predictor"):
        open_pack(g)  # what verify, inspect and the curve read
    dense = RippleLlama(str(g), quality="0%", n_ctx=64, verbose=False)
    assert dense.ripple_point["path"] == "stock"
    dense.close()
    with pytest.raises(RippleError, match="predictor"):
        RippleLlama(str(g), quality="100%", n_ctx=64, verbose=False, dense_fallback=False, stock_when_dense=False)
