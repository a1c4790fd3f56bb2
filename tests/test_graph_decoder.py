"""GraphDecoder's bookkeeping on the CPU: which captures it makes (one per precision and
sparsity setting), when it recaptures (cache reallocated), the summaries sparse layers select
pages from (rebuilt outside the graph when stale, marked current after each step), and that
its steps give the logits of eager decoding, dense and past the page budget.

The CUDA graph itself is replaced by a stand-in that re-runs the captured step at each replay
and copies the result into the logits tensor the capture returned (what a replay writes);
tests/test_cuda.py runs the real graphs on a GPU."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from bitswitch.models.cuda_graph import GraphDecoder  # noqa: E402
from bitswitch.models.load import load  # noqa: E402
from test_qwen3 import VOCAB, make_hf, rel  # noqa: E402


class EagerGraphs(GraphDecoder):
    """A GraphDecoder whose graphs are the captured step run again at each replay."""

    def _check_device(self, device):
        pass

    def _capture_step(self, step):
        logits = step()
        return (lambda: logits.copy_(step())), logits


@pytest.fixture
def model(tmp_path):
    make_hf("qwen3", tied=False).save_pretrained(tmp_path)
    m = load(tmp_path, dtype="float32", group_size=32)
    m.prefill_plan = {"method": "causal"}
    return m


def eager_steps(model, ids, start, stop, switch=None):
    out = []
    for i in range(start, stop):
        if switch:
            switch(i)
        out.append(model(ids[:, i:i + 1]))
    return torch.cat(out, 1)


def graph_steps(dec, ids, start, stop, switch=None):
    out = []
    for i in range(start, stop):
        if switch:
            switch(i)
        out.append(dec.step(ids[:, i:i + 1]).clone())
    return torch.cat(out, 1)


def test_one_capture_per_setting(model):
    """Dense decode: the eager logits; a precision switch between tokens captures once more,
    switching back reuses the first graph."""
    ids = torch.randint(0, VOCAB, (1, 40))
    model.set_bits(8)
    model.reset(capacity=64)
    model(ids[:, :20])

    def switch(i):
        if i in (26, 32):
            model.set_bits(4 if i == 26 else 8)

    ref = eager_steps(model, ids, 20, 38, switch)
    model.truncate(20)
    model.set_bits(8)
    dec = EagerGraphs(model)
    got = graph_steps(dec, ids, 20, 38, switch)
    assert rel(got, ref) <= 3e-4
    assert dec.captures == 2 and len(dec.graphs) == 2
    assert model.cache.length == 38


def test_sparse_layers_decode_in_the_graph(model, monkeypatch):
    """Past the page budget the graph selects pages itself: the logits of eager decoding with
    host-side page selection; a layer made sparse mid-run is a new capture whose summaries are
    built before it; after truncate (a chat turn) the summaries are rebuilt in place."""
    ids = torch.randint(0, VOCAB, (1, 330))
    model.set_bits(4)
    model.layers[0].self_attn.sparse = {"pages": 2}
    model.reset(capacity=400)

    def switch(i):
        model.layers[1].self_attn.sparse = {"pages": 3} if i >= 300 else None

    monkeypatch.setattr("bitswitch.models.qwen3._pages_on_device", lambda q: False)  # host selection
    model(ids[:, :250])
    ref = eager_steps(model, ids, 250, 330, switch)
    monkeypatch.undo()
    switch(0)
    model.truncate(250)
    dec = EagerGraphs(model)
    got = graph_steps(dec, ids, 250, 330, switch)
    assert rel(got, ref) <= 3e-4
    assert dec.captures == 2
    pages = [model.cache.pages[i] for i in (0, 1)]
    assert all(p is not None and p.length == 330 for p in pages)
    kmin = [p.kmin.data_ptr() for p in pages]
    model.truncate(260)  # stale, kept in place: the captured graphs still point at them
    switch(0)
    again = graph_steps(dec, ids, 260, 270)
    assert rel(again, ref[:, 10:20]) <= 3e-4
    assert [p.kmin.data_ptr() for p in model.cache.pages[:2]] == kmin
    assert dec.captures == 2


def test_recapture_after_the_cache_is_reallocated(model):
    ids = torch.randint(0, VOCAB, (1, 30))
    model.set_bits(8)
    model.reset(capacity=32)
    model(ids[:, :10])
    dec = EagerGraphs(model)
    dec.step(ids[:, 10:11])
    assert dec.captures == 1
    model.reset(capacity=48)  # a new cache: the old graphs' addresses are gone
    model(ids[:, :10])
    ref = model(ids[:, 10:11]).clone()
    model.truncate(10)
    got = dec.step(ids[:, 10:11])
    assert dec.captures == 2 and dec.cache is model.cache
    assert rel(got, ref) <= 3e-4
    model.cache.length = model.cache.capacity - 1  # one free slot
    dec.step(ids[:, :1])
    with pytest.raises(ValueError, match="GraphDecoder: the cache is full"):
        dec.step(ids[:, :1])
    with pytest.raises(ValueError, match=r"ids must be \[1, 1\] or \[1\] \(this decoder was made for batch 1\)"):
        dec.step(ids[:, :2])
    model.reset(batch=2)
    with pytest.raises(ValueError, match="the model's cache now holds batch 2, this decoder was made for batch 1"):
        dec.step(ids[:, :1])
