"""bitswitch.mlx on mlx-lm models: QuantizedLinear replaces mlx.nn's Linear / QuantizedLinear in
a model mlx-lm loads, the logits follow, and the bits switch at run time without a reload.
Off a Metal GPU (here) the layers run bitswitch's CPU kernels; tests/metal covers the
Metal kernels and the MLX launch path."""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")
mlx_lm = pytest.importorskip("mlx_lm")
pytest.importorskip("transformers")

import bitswitch as bs  # noqa: E402
import bitswitch.mlx as bsm  # noqa: E402
from test_checkpoints import mlx_convert, save_tokenizer  # noqa: E402
from test_qwen3 import VOCAB, make_hf  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    src = tmp_path_factory.mktemp("hf")
    make_hf("qwen3", tied=False, seed=3).save_pretrained(src)
    save_tokenizer(src)
    root = tmp_path_factory.mktemp("mlx")
    out = {"float": src}
    for bits in (4, 8):
        out[bits] = mlx_convert(src, root / f"q{bits}", q_bits=bits, q_group_size=64)
    return out


def logits(model, ids):
    return np.array(model(mx.array(ids)).astype(mx.float32), dtype=np.float64)


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def count(model, cls):
    return sum(isinstance(m, cls) for _, m in model.named_modules())


def test_mlx_lm_8bit_model_runs_on_bitswitch_layers(folders, rng):
    """An mlx-lm 8-bit model: the INT8 view reproduces MLX's dequantization exactly, so the
    logits match mlx-lm's own to the activations' 15-bit rounding on the CPU; set_bits(4) reads plane 0 only, and
    switching back gives the same logits bit for bit."""
    ids = rng.integers(0, VOCAB, (2, 9))
    model, _ = mlx_lm.load(str(folders[8]))
    ref = logits(model, ids)
    n = count(model, nn.QuantizedLinear)
    bsm.quantize_model(model)
    assert count(model, bsm.QuantizedLinear) == n and count(model, nn.QuantizedLinear) == 0
    y8 = logits(model, ids)
    assert rel(y8, ref) <= 3e-4
    assert bsm.set_bits(model, 4) == n
    y4 = logits(model, ids)
    assert 1e-3 < rel(y4, ref) < 0.5
    assert bsm.set_bits(model, {"*": 8, "*.mlp.*": 4}) > 0
    mixed = logits(model, ids)
    assert not np.array_equal(mixed, y4) and not np.array_equal(mixed, y8)
    bsm.set_bits(model, 8)
    assert np.array_equal(logits(model, ids), y8)


def test_mlx_lm_4bit_model_is_int4_only(folders, rng):
    ids = rng.integers(0, VOCAB, (1, 7))
    model, _ = mlx_lm.load(str(folders[4]))
    ref = logits(model, ids)
    bsm.quantize_model(model)
    assert rel(logits(model, ids), ref) <= 3e-4
    layer = next(m for _, m in model.named_modules() if isinstance(m, bsm.QuantizedLinear))
    assert layer.bits == 4 and layer.qweight.bits_available == (4,)
    with pytest.raises(ValueError, match="without plane 1"):
        layer.bits = 8


def test_float_model_quantized_in_place(folders, rng):
    """mlx.nn.Linear layers of a float mlx-lm model quantized to both planes here."""
    ids = rng.integers(0, VOCAB, (1, 11))
    model, _ = mlx_lm.load(str(folders["float"]))
    ref = logits(model, ids)
    bsm.quantize_model(model, bits=8, group_size=32, predicate=lambda path, m: "embed" not in path)
    y8 = logits(model, ids)
    assert rel(y8, ref) <= 2e-2
    bsm.set_bits(model, 4)
    assert rel(logits(model, ids), ref) > rel(y8, ref)


def test_quantized_linear_layer(rng):
    lin = nn.Linear(128, 40, bias=True)
    q = bsm.QuantizedLinear.from_linear(lin, bits=8, group_size=64)
    x = mx.array(rng.standard_normal((3, 128)).astype(np.float32))
    w = np.array(lin.weight, np.float64)
    ref = np.array(x, np.float64) @ w.T + np.array(lin.bias, np.float64)
    assert rel(np.array(q(x), np.float64), ref) <= 2e-2
    assert "bits=8" in repr(q)
    # The packed arrays are frozen parameters: an optimizer sees nothing to train.
    assert q.trainable_parameters() == {}
    assert set(q.parameters()) == {"plane0", "plane1", "scales", "biases", "bias"}
    with pytest.raises(ValueError, match="bits must be"):
        q.bits = 3
    with pytest.raises(TypeError, match="expected mlx.nn.Linear"):
        bsm.QuantizedLinear.from_linear(nn.Embedding(10, 8))
    assert not bsm.metal_available() or bsm._on_gpu() in (True, False)


def test_qmatmul_and_attention_off_the_gpu(rng):
    """Without a Metal GPU the module's ops are bitswitch.ops on MLX arrays."""
    qw = bs.quantize((rng.standard_normal((16, 64)) * 0.05).astype(np.float32), group_size=32, bits=8).mlx()
    x = mx.array(rng.standard_normal((2, 64)).astype(np.float32))
    assert np.array_equal(np.array(bsm.qmatmul(x, qw, 4)), np.array(bs.ops.qmatmul(x, qw, 4)))
    q = mx.array(rng.standard_normal((1, 2, 3, 64)).astype(np.float32))
    k = mx.array(rng.standard_normal((1, 1, 5, 64)).astype(np.float32))
    out = bsm.attention(q, k, k, q_offset=2)
    assert isinstance(out, mx.array) and out.shape == (1, 2, 3, 64)
