"""Quantized checkpoint formats through one bitswitch.load: MLX affine (converted by mlx-lm
itself, compared with mlx-lm's own forward), AWQ and GPTQ (packed here from known integer
codes by an independent packer, compared with transformers on the dequantized weights),
bitswitch's saved planes (exact round trips), malformed checkpoints and repo ids."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402
from test_qwen3 import VOCAB, make_hf, rel  # noqa: E402

import bitswitch as bs  # noqa: E402
from bitswitch.models import Qwen3Config, resolve_model_path, save_quantized  # noqa: E402
from bitswitch.models.formats import projections  # noqa: E402
from bitswitch.models.load import load  # noqa: E402


def save_tokenizer(folder) -> None:
    """A tiny word-level tokenizer (mlx_lm.convert needs one in its source folder)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1").save_pretrained(folder)


@pytest.fixture(scope="module")
def hf_sources(tmp_path_factory):
    """Float Qwen3 checkpoints written by transformers (fp32), tied and untied, with a tokenizer."""
    out = {}
    for tied in (True, False):
        d = tmp_path_factory.mktemp(f"hf_tied{tied}")
        make_hf("qwen3", tied=tied, seed=int(tied)).save_pretrained(d)
        save_tokenizer(d)
        out[tied] = d
    return out


def mixed_recipe(path, module):
    """4-bit g64 by default; down_proj 8-bit g32, lm_head 8-bit g128, one v_proj left float."""
    if path.endswith("down_proj"):
        return {"group_size": 32, "bits": 8, "mode": "affine"}
    if path == "lm_head":
        return {"group_size": 128, "bits": 8, "mode": "affine"}
    return path != "model.layers.1.self_attn.v_proj"


def mlx_convert(src, dst, **kw):
    mlx_lm = pytest.importorskip("mlx_lm")
    mlx_lm.convert(str(src), str(dst), quantize=True, **kw)
    return dst


MLX_CASES = {  # name: (tied, convert arguments)
    "tied_4bit_g64": (True, dict(q_bits=4, q_group_size=64)),
    "untied_8bit_g32": (False, dict(q_bits=8, q_group_size=32)),
    "untied_mixed": (False, dict(q_bits=4, q_group_size=64, quant_predicate=mixed_recipe)),
}


@pytest.fixture(scope="module")
def mlx_ckpts(hf_sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlx")
    return {name: mlx_convert(hf_sources[tied], root / name, **kw) for name, (tied, kw) in MLX_CASES.items()}


def mlx_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    import mlx.core as mx
    import mlx_lm

    model, _ = mlx_lm.load(str(folder))
    return torch.from_numpy(np.array(model(mx.array(ids.numpy())).astype(mx.float32)))


def random_ids(rng, shape) -> torch.Tensor:
    return torch.from_numpy(rng.integers(0, VOCAB, shape))


def linear(model, path):
    return model.embed_tokens.lin if path == "model.embed_tokens" else model.get_submodule(path.removeprefix("model."))


@pytest.mark.parametrize("name", list(MLX_CASES))
def test_mlx_matches_mlx_lm(mlx_ckpts, rng, name):
    """bitswitch's forward on an mlx-lm checkpoint equals mlx-lm's (float32 activations; the
    same quantized weights, MLX 8-bit split exactly into two planes; a module mlx-lm left
    float read in its kept float tier): rel. error <= 1e-4."""
    folder = mlx_ckpts[name]
    ids = random_ids(rng, (2, 23))
    ref = mlx_logits(folder, ids)
    model = load(folder, dtype="float32", group_size=32, keep_float=True)
    float_module = "model.layers.1.self_attn.v_proj" if name == "untied_mixed" else None
    if float_module:
        linear(model, float_module).bits = "full"
    assert rel(model(ids), ref) <= 1e-4
    quant = json.loads((folder / "config.json").read_text())["quantization"]
    for path in projections(model.config):
        lin = linear(model, path)
        entry = quant.get(path)
        if path == float_module:
            assert entry is None and lin.bits_available == (4, 8, "full") and lin.group_size == 32
            continue
        bits = entry["bits"] if isinstance(entry, dict) else quant["bits"]
        gs = entry["group_size"] if isinstance(entry, dict) else quant["group_size"]
        # each projection starts in its most precise view; MLX 4-bit holds no plane 1
        assert (lin.bits, lin.group_size, lin.plane1 is None) == (bits, gs, bits == 4), path
    if name == "tied_4bit_g64":
        assert model.lm_head is model.embed_tokens.lin  # logits through the quantized embedding
        with pytest.raises(ValueError, match=r"bits=8 asked of 16 weights that lack plane 1"):
            model.set_bits(8)
        assert model.lm_head.bits == 4  # nothing changed
    else:
        model.set_bits(4)  # the INT4 view of 8-bit and float-quantized weights comes free
        assert all(m.bits == 4 for m in model.linears().values())


def test_mlx_rejects_unsupported(hf_sources, mlx_ckpts, tmp_path):
    """mixed_4_6 writes 6-bit layers; other modes and bits fail on the config alone."""
    six = mlx_convert(hf_sources[False], tmp_path / "m46", q_group_size=64, quant_predicate="mixed_4_6")
    with pytest.raises(ValueError, match="6-bit weights are not supported; supported: 4, 8 bits"):
        load(six)
    src = mlx_ckpts["tied_4bit_g64"]
    config = json.loads((src / "config.json").read_text())
    for quant, msg in (({"group_size": 32, "bits": 4, "mode": "mxfp4"}, "mode 'mxfp4' is not supported"),
                       ({"group_size": 64, "bits": 3}, "3-bit weights are not supported"),
                       ({"group_size": 16, "bits": 4}, "group_size 16 is not supported")):
        d = tmp_path / quant.get("mode", str(quant["bits"]) + str(quant["group_size"]))
        d.mkdir()
        (d / "config.json").write_text(json.dumps(dict(config, quantization=quant, quantization_config=quant)))
        (d / "model.safetensors").symlink_to(src / "model.safetensors")
        with pytest.raises(ValueError, match=msg):
            load(d)


# -- AWQ / GPTQ: an independent packer following the published layouts -------------------------
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of a word holds column 8c + AWQ_ORDER[i]


def pack_awq(codes_kn: np.ndarray) -> np.ndarray:
    """[R, N] codes -> int32 [R, N/8] packed along N in AWQ's order."""
    words = np.zeros((codes_kn.shape[0], codes_kn.shape[1] // 8), np.uint32)
    for i, col in enumerate(AWQ_ORDER):
        words |= codes_kn[:, col::8].astype(np.uint32) << np.uint32(4 * i)
    return words.view(np.int32)


def pack_gptq_rows(codes_kn: np.ndarray) -> np.ndarray:
    """[K, N] codes -> int32 [K/8, N] packed along K (input 8r + j in bits 4j of row r)."""
    words = np.zeros((codes_kn.shape[0] // 8, codes_kn.shape[1]), np.uint32)
    for j in range(8):
        words |= codes_kn[j::8].astype(np.uint32) << np.uint32(4 * j)
    return words.view(np.int32)


def pack_gptq_cols(codes: np.ndarray) -> np.ndarray:
    """[R, N] codes -> int32 [R, N/8] packed along N in order."""
    return pack_gptq_rows(codes.T).T.copy()


def write_int4(method: str, kind: str, sym: bool, gs: int, folder, rng, v2: bool = False):
    """A transformers model whose projections are replaced by known 4-bit codes, saved as an
    AWQ or GPTQ checkpoint; returns (the model holding the dequantized weights, {path: W})."""
    hf = make_hf(kind, tied=False, seed=int(rng.integers(1 << 30)))
    tensors = {k: v.contiguous() for k, v in hf.state_dict().items()}
    cfg = Qwen3Config.from_dict(hf.config.to_dict())
    weights = {}
    for path, (n, k) in projections(cfg).items():
        if path in ("model.embed_tokens", "lm_head"):
            continue
        q = rng.integers(0, 16, (k, n))
        lo = 0 if method == "awq" else (0 if v2 else 1)  # v1 stores zero - 1 in a nibble: zeros 1..16
        z = np.full((k // gs, n), 8) if sym else rng.integers(lo, lo + 16, (k // gs, n))
        s = torch.from_numpy(rng.uniform(0.002, 0.02, (k // gs, n))).half()
        w = (q - np.repeat(z, gs, axis=0)) * np.repeat(s.double().numpy(), gs, axis=0)  # [K, N]
        weights[path] = torch.from_numpy(w.T.astype(np.float32))
        del tensors[path + ".weight"]
        tensors[path + ".scales"] = s
        if method == "awq":
            tensors[path + ".qweight"] = torch.from_numpy(pack_awq(q))
            tensors[path + ".qzeros"] = torch.from_numpy(pack_awq(z))
        else:
            tensors[path + ".qweight"] = torch.from_numpy(pack_gptq_rows(q))
            tensors[path + ".qzeros"] = torch.from_numpy(pack_gptq_cols(z - (0 if v2 else 1)))
            tensors[path + ".g_idx"] = torch.arange(k, dtype=torch.int32) // gs
    with torch.no_grad():
        for path, w in weights.items():
            hf.get_submodule(path).weight.copy_(w)
    qc = ({"quant_method": "awq", "bits": 4, "group_size": gs, "version": "gemm", "zero_point": True}
          if method == "awq" else
          {"quant_method": "gptq", "bits": 4, "group_size": gs, "desc_act": False, "sym": sym,
           "checkpoint_format": "gptq_v2" if v2 else "gptq"})
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(hf.config.to_dict(), quantization_config=qc)))
    save_file(tensors, folder / "model.safetensors")
    return hf, weights


INT4_CASES = [("awq", "qwen3", False, 128, False), ("gptq", "qwen3", True, 32, False),
              ("gptq", "qwen2", False, 64, False), ("gptq", "qwen3", False, 64, True)]


@pytest.mark.parametrize("method,kind,sym,gs,v2", INT4_CASES)
def test_awq_gptq_match_transformers(tmp_path, rng, capsys, method, kind, sym, gs, v2):
    """Each projection's plane 0 dequantizes exactly to (q - z) * s; the logits equal a
    transformers forward on those float weights (embedding and lm_head: their INT8 view)
    within 2e-4 (the kernels' float32 accumulation)."""
    hf, weights = write_int4(method, kind, sym, gs, tmp_path / "ckpt", rng, v2)
    model = load(tmp_path / "ckpt", dtype="float32", group_size=64, progress=True)
    assert f"load: 16/16 weights ({method[:4].upper()})" in capsys.readouterr().err
    for path, w in weights.items():
        lin = linear(model, path)
        assert lin.plane1 is None and lin.bits == 4 and lin.group_size == gs
        assert np.array_equal(bs.dequantize_f64(lin.qweight), w.double().numpy()), path
    with torch.no_grad():
        for path in ("model.embed_tokens", "lm_head"):
            deq = bs.dequantize(linear(model, path).qweight, bits=8)
            hf.get_submodule(path).weight.copy_(torch.from_numpy(np.asarray(deq, np.float32)))
    ids = random_ids(rng, (2, 19))
    with torch.no_grad():
        ref = hf(ids).logits
    assert rel(model(ids), ref) <= 2e-4
    with pytest.raises(ValueError, match=r"bits=8 asked of 14 weights that lack plane 1 .*model.layers.0.self_attn.q_proj"):
        model.set_bits(8)


def test_int4_rejections(tmp_path, rng):
    write_int4("gptq", "qwen3", True, 32, tmp_path / "gptq", rng)
    tensors = load_file(tmp_path / "gptq" / "model.safetensors")
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())

    def variant(name, mutate_tensors=None, qc=None):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(dict(config, quantization_config=dict(config["quantization_config"],
                                                                                         **(qc or {})))))
        t = dict(tensors)
        if mutate_tensors:
            mutate_tensors(t)
        save_file(t, d / "model.safetensors")
        return d

    act = torch.randperm(128).to(torch.int32) // 32  # desc_act: groups follow activation order
    d = variant("act_order", lambda t: t.__setitem__("model.layers.1.mlp.up_proj.g_idx", act), {"desc_act": True})
    with pytest.raises(ValueError, match=r"up_proj.g_idx is not i // group_size: act-order \(desc_act\)"):
        load(d)
    with pytest.raises(ValueError, match="group_size 256 is not supported by the kernels; supported: 32, 64, 128"):
        load(variant("g256", qc={"group_size": 256}))
    with pytest.raises(ValueError, match="group_size -1 is not supported"):
        load(variant("per_column", qc={"group_size": -1}))
    with pytest.raises(ValueError, match="8-bit weights are not supported; supported: 4 bits"):
        load(variant("gptq8", qc={"bits": 8}))
    with pytest.raises(ValueError, match="quant_method 'bitsandbytes' is not supported"):
        load(variant("bnb", qc={"quant_method": "bitsandbytes"}))
    with pytest.raises(ValueError, match="checkpoint_format 'marlin' is not supported"):
        load(variant("marlin", qc={"checkpoint_format": "marlin"}))
    d = variant("qzeros_dtype", lambda t: t.__setitem__("model.layers.0.mlp.gate_proj.qzeros",
                                                        t["model.layers.0.mlp.gate_proj.qzeros"].float()))
    with pytest.raises(ValueError, match="gate_proj.qzeros has dtype F32; GPTQ checkpoints hold I32 there"):
        load(d)
    d = variant("awq_as_gptq", qc={"quant_method": "awq", "version": "gemv"})
    with pytest.raises(ValueError, match="AWQ version 'gemv' is not supported"):
        load(d)


def test_malformed_mlx(mlx_ckpts, tmp_path):
    src = mlx_ckpts["untied_mixed"]
    config = (src / "config.json").read_text()
    tensors = load_file(src / "model.safetensors")

    def variant(name, mutate):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(config)
        t = dict(tensors)
        mutate(t)
        save_file(t, d / "model.safetensors", metadata={"format": "mlx"})
        return d

    m = "model.layers.0.mlp.down_proj"  # named in the config's per-module overrides
    with pytest.raises(ValueError, match=f"1 tensors missing .*{m}.scales"):
        load(variant("no_scales", lambda t: t.pop(m + ".scales")))
    with pytest.raises(ValueError, match=rf"{m}.biases has shape \(128, 4\), the config implies \(128, 8\)"):
        load(variant("shape", lambda t: t.__setitem__(m + ".biases", t[m + ".biases"][:, :4].contiguous())))
    with pytest.raises(ValueError, match=f"{m}.weight has dtype I32; MLX affine checkpoints hold U32 there"):
        load(variant("dtype", lambda t: t.__setitem__(m + ".weight", t[m + ".weight"].view(torch.int32))))
    with pytest.raises(ValueError, match=r"scales \(torch.float32\) and .* \(torch.float16\) must share a dtype"):
        load(variant("mixed_dtypes", lambda t: t.__setitem__(m + ".biases", t[m + ".biases"].half())))
    v = "model.layers.1.self_attn.v_proj"  # float in this checkpoint: stray quantization tensors are caught
    with pytest.raises(ValueError, match=f"missing .*{v}.scales"):
        load(variant("stray", lambda t: t.__setitem__(v + ".biases", torch.zeros(128, 2))))


# -- bitswitch's saved format ----------------------------------------------------------------
def assert_same(a, b, ids) -> None:
    """Same planes, scales, biases and norms, bit for bit, and the same logits in the
    starting views and in each view all layers hold."""
    la, lb = a.linears(), b.linears()
    assert la.keys() == lb.keys()
    for name in la:
        for buf in ("plane0", "plane1", "scales", "biases"):
            x, y = getattr(la[name], buf), getattr(lb[name], buf)
            assert (x is None and y is None) or torch.equal(x, y), (name, buf)
        assert la[name].group_size == lb[name].group_size and la[name].bits == lb[name].bits
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na
    for model in (a, b):
        model.reset()
    assert torch.equal(a(ids), b(ids))
    for bits in (8, 4) if all(8 in m.bits_available for m in la.values()) else (4,):
        for model in (a, b):
            model.set_bits(bits)
            model.reset()
        assert torch.equal(a(ids), b(ids)), bits


@pytest.mark.parametrize("kind,tied", [("qwen3", True), ("qwen2", False)])
def test_save_float_round_trip(tmp_path, rng, kind, tied):
    src = tmp_path / "src"
    make_hf(kind, tied=tied, seed=int(rng.integers(1 << 30))).save_pretrained(src)
    save_tokenizer(src)
    ids = random_ids(rng, (1, 21))
    ref = load(src, dtype="float32", group_size=32)
    for bits in (8, 4):
        dst = save_quantized(src, tmp_path / f"saved{bits}", bits=bits, group_size=32)
        cfg = json.loads((dst / "config.json").read_text())
        assert cfg["bitswitch"] == {"format": "bitswitch", "version": 1, "bits": bits, "group_size": 32, "modules": {}}
        assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in dst.iterdir()}
        from safetensors import safe_open

        with safe_open(str(dst / "model.safetensors"), "pt") as f:
            assert f.metadata()["format"] == "bitswitch"
            assert any(k.endswith(".plane1") for k in f.keys()) == (bits == 8)
        got = load(dst, dtype="float32", group_size=128)  # the saved group size wins: no re-quantization
        if bits == 4:  # the reference without its plane 1: the INT4 view it had
            for m in ref.linears().values():
                m.register_buffer("plane1", None)
                m.bits = 4
        assert_same(got, ref, ids)


def test_save_mlx_and_model_round_trip(mlx_ckpts, rng, tmp_path):
    """Mixed MLX (4-bit, 8-bit, float, three group sizes) -> saved -> load: identical; a
    loaded model saves the same way."""
    src = mlx_ckpts["untied_mixed"]
    ids = random_ids(rng, (1, 17))
    ref = load(src, dtype="float32", group_size=64)
    dst = save_quantized(src, tmp_path / "saved", bits=8, group_size=64)
    modules = json.loads((dst / "config.json").read_text())["bitswitch"]["modules"]
    assert modules["model.layers.0.self_attn.q_proj"] == {"bits": 4, "group_size": 64}
    assert modules["model.layers.0.mlp.down_proj"] == {"bits": 8, "group_size": 32}
    assert "model.layers.1.self_attn.v_proj" not in modules  # float in the source: INT8 g64 at load
    assert_same(load(dst, dtype="float32"), ref, ids)
    again = save_quantized(ref, tmp_path / "from_model", bits=8, group_size=64)
    assert_same(load(again, dtype="float32"), load(src, dtype="float32", group_size=64), ids)
    with pytest.raises(FileExistsError, match="not an empty folder"):
        save_quantized(ref, dst)
    with pytest.raises(ValueError, match="bits must be 4 .* or 8"):
        save_quantized(ref, tmp_path / "b6", bits=6)


def test_resolve_model_path_offline(tmp_path, monkeypatch):
    assert resolve_model_path(tmp_path) == tmp_path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for call in (resolve_model_path, load):
        with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache, and HF_HUB_OFFLINE is set"):
            call("bitswitch-tests/no-such-model")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        resolve_model_path(tmp_path / "missing")
