"""The model commands: generate, chat, quantize, info MODEL (on a tiny random checkpoint)."""

import io

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from bitswitch import cli  # noqa: E402
from bitswitch.models import Tokenizer, load  # noqa: E402

from test_generate import checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    checkpoint(path, seed=7)
    return path


def test_int8_activations_from_the_model_and_the_cli(folder, capsys):
    """Qwen3.set_act_bits sets every layer's activation precision (int8: a small change of the
    logits), 16 restores the float-grade logits exactly; generate --act-bits 8 runs on it."""
    model = load(folder, dtype="float32")
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]])

    def logits():
        model.reset()
        return model(ids)

    ref = logits()
    model.set_act_bits(8)
    assert {m.act_bits for m in model.linears().values()} == {8}
    d = float((logits() - ref).abs().max() / ref.abs().max())
    assert 1e-5 < d < 5e-2, d
    model.set_act_bits(16)
    assert torch.equal(logits(), ref)
    with pytest.raises(ValueError, match="Qwen3.set_act_bits: act_bits must be 16"):
        model.set_act_bits(4)
    assert cli.main(["generate", "hello world", "-m", str(folder), "--bits", "4", "--act-bits", "8",
                     "--temperature", "0", "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("hello world") and "tok/s" in err
    with pytest.raises(SystemExit):
        cli.main(["generate", "x", "-m", str(folder), "--act-bits", "4"])
    capsys.readouterr()
    assert cli.main(["generate", "x", "-m", str(folder), "--act-bits", "8", "--device", "mps"]) == 1
    assert "int8 activations are a CPU path" in capsys.readouterr().err


def test_generate_greedy_prints_the_models_tokens(folder, capsys):
    assert cli.main(["generate", "hello world", "-m", str(folder), "--bits", "8", "--dtype", "float32",
                     "--temperature", "0", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    # The same greedy tokens computed here with the model directly.
    model, tok = load(folder, dtype="float32"), Tokenizer.from_dir(folder)
    ids = tok.encode("hello world")
    got = []
    logits = model(torch.tensor([ids]))
    for _ in range(6):
        nxt = int(logits[0, -1].argmax())
        if nxt in tok.eos_token_ids:
            break
        got.append(nxt)
        logits = model(torch.tensor([[nxt]]))
    assert out.rstrip("\n") == "hello world" + tok.decode(got)
    assert "prompt tokens" in err and "tok/s" in err


def test_quantize_info_and_chat(folder, tmp_path, capsys, monkeypatch):
    dst = tmp_path / "q4"
    assert cli.main(["quantize", str(folder), str(dst), "--bits", "4", "--group-size", "32"]) == 0
    assert cli.main(["info", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "views 4" in out and "views 4, 8" not in out and "at 4-bit" in out and "at 8-bit" not in out
    # The saved INT4 model holds no plane 1: asking for 8 bits is a clear error, not a crash.
    assert cli.main(["generate", "x", "-m", str(dst), "--bits", "8", "--max-new-tokens", "2"]) == 1
    assert "lack plane 1" in capsys.readouterr().err
    # Two turns, a precision switch refused with a message, then exit.
    monkeypatch.setattr("sys.stdin", io.StringIO("hi there\n/bits 8\nand again\n/exit\n"))
    assert cli.main(["chat", "-m", str(dst), "--no-think", "--max-new-tokens", "4", "--seed", "3"]) == 0
    err = capsys.readouterr().err
    assert err.count("new tokens at") == 2 and "lack plane 1" in err


def test_model_commands_reject_bad_input(folder, tmp_path, capsys):
    assert cli.main(["generate", "x", "-m", str(tmp_path / "nowhere")]) == 1
    assert "nowhere" in capsys.readouterr().err
    assert cli.main(["generate", "x", "-m", str(folder), "--top-p", "1.5"]) == 1
    assert "top_p" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["quantize", str(folder), str(tmp_path / "o"), "--bits", "3"])
    assert cli.main(["generate", "x", "-m", str(folder), "--device", "tpu9"]) == 1
    assert "--device must be cpu, cuda[:N] or mps, got 'tpu9'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["generate", "x", "-m", str(folder), "--device", "cuda"]) == 1
        assert "torch sees no CUDA device" in capsys.readouterr().err


def test_generate_demo_switches_without_reloading(capsys):
    """The README's main command: the embedded model in INT8, then switched to INT4."""
    assert cli.main(["generate", "--demo", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "--- performance: 8.50 bits per weight" in out and "--- efficiency: 4.50 bits per weight" in out
    assert out.count("The Python language") == 2


def test_chat_switches_precision_between_turns(capsys, monkeypatch):
    """/mode, /precision (a JSON policy, or none: the report) and a bad /mode between turns,
    on the embedded model: the conversation goes on, nothing is reloaded."""
    lines = ["hello", "/mode efficiency", "/precision", 'more /no_think', '/precision {"*": 8, "0": 4}',
             "/mode turbo", "last", "/exit"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert cli.main(["chat", "--max-new-tokens", "3", "--seed", "1"]) == 0
    err = capsys.readouterr().err
    assert err.count("new tokens at") == 3
    assert "precision: 4.50 bits per weight" in err      # /mode efficiency
    assert "sparse" in err and "MiB of weights per token" in err  # the /precision report
    assert "/mode takes one of performance, efficiency, full" in err
