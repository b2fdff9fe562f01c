"""GRAPH_MODE training on packed varlen batches compiles once: new length values are runtime data.

Compiles are counted three independent ways (see docs/training.md, "Counting compiles"):
- the graph executor's own answer: `_cell_graph_executor.compile` returns (phase, compiled_now) and
  `@ms.jit` functions add each newly compiled phase to `mindspore.graph.api.ms_compile_cache`;
- the Cell's `compile_cache` (one phase per distinct compiled signature);
- calls of our op's shape inference, which MindSpore runs only while compiling a graph.
"""
import contextlib

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn
from mindspore.graph import api as graph_api

import ms_nsa
from ms_nsa import op_def

HIDDEN, BLOCK, COUNT = 32, 16, 2
STEPS = 20


class CompileCounter:
    def __init__(self):
        self.cell_compiles = 0           # Cell graphs the executor actually compiled
        self.cell_cache_hits = 0         # Cell calls served by an already compiled graph
        self.shape_inferences = 0        # our op's out_shape callable (compile time only)
        self._jit_phases_before = len(graph_api.ms_compile_cache)

    @property
    def jit_compiles(self):
        return len(graph_api.ms_compile_cache) - self._jit_phases_before


@contextlib.contextmanager
def counting_compiles(monkeypatch):
    counter = CompileCounter()
    executor = graph_api._cell_graph_executor
    compile_cell = executor.compile
    infer_shapes = op_def.OpDef.infer_shapes

    def counted_compile(obj, *args, **kwargs):
        phase, compiled_now = compile_cell(obj, *args, **kwargs)
        if compiled_now:
            counter.cell_compiles += 1
        else:
            counter.cell_cache_hits += 1
        return phase, compiled_now

    def counted_infer(self, *args, **kwargs):
        counter.shape_inferences += 1
        return infer_shapes(self, *args, **kwargs)

    monkeypatch.setattr(executor, "compile", counted_compile)
    monkeypatch.setattr(op_def.OpDef, "infer_shapes", counted_infer)
    previous_mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        yield counter
    finally:
        ms.set_context(mode=previous_mode)


class Loss(nn.Cell):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def construct(self, x, actual_seq_len, target):
        return ((self.layer(x, actual_seq_len) - target) ** 2).mean()


def make_loss():
    ms.set_seed(0)
    layer = ms_nsa.nn.NativeSparseAttention(HIDDEN, 4, 2, 16, compress_block_size=BLOCK, compress_stride=BLOCK,
                                            select_block_size=BLOCK, select_block_count=COUNT, select_local_blocks=1,
                                            window_size=16)
    return Loss(layer), layer.trainable_params()


def random_lengths(rng, tokens, sequences):
    """Cumulative lengths of `sequences` random sequences filling `tokens`, each a multiple of BLOCK
    and at least BLOCK * COUNT long (the op's contract)."""
    spare = tokens // BLOCK - sequences * COUNT
    cuts = np.sort(rng.integers(0, spare + 1, sequences - 1))
    blocks = np.diff(np.concatenate([[0], cuts, [spare]])) + COUNT
    return Tensor(np.cumsum(blocks * BLOCK).astype(np.int64))


def batch(rng, tokens, sequences):
    return (Tensor(rng.standard_normal((tokens, HIDDEN)).astype(np.float32)),
            random_lengths(rng, tokens, sequences),
            Tensor(rng.standard_normal((tokens, HIDDEN)).astype(np.float32)))


def test_train_one_step_cell_compiles_once_for_changing_lengths(monkeypatch):
    rng = np.random.default_rng(0)
    with counting_compiles(monkeypatch) as counter:
        loss, params = make_loss()
        train_step = nn.TrainOneStepCell(loss, nn.Adam(params, learning_rate=1e-3))
        seen_lengths, losses = set(), []
        for step in range(STEPS):
            inputs = batch(rng, 256, 3)
            seen_lengths.add(tuple(inputs[1].asnumpy()))
            losses.append(float(train_step(*inputs).asnumpy()))
            if step == 0:
                inferences_per_compile = counter.shape_inferences
        assert len(seen_lengths) >= STEPS // 2      # the lengths really changed
        assert np.isfinite(losses).all()
        assert counter.cell_compiles == 1 and counter.cell_cache_hits == STEPS - 1
        assert len(train_step.compile_cache) == 1
        assert inferences_per_compile > 0 and counter.shape_inferences == inferences_per_compile

        # What does recompile: a new number of sequences B (the lengths tensor's shape) or a new token
        # count T (the inputs' shapes). Shapes seen before are served from the cache.
        for tokens, sequences, compiles in ((256, 4, 2), (320, 3, 3), (256, 3, 3), (256, 4, 3)):
            train_step(*batch(rng, tokens, sequences))
            assert counter.cell_compiles == compiles, (tokens, sequences)
            assert counter.shape_inferences == compiles * inferences_per_compile
        assert len(train_step.compile_cache) == 3


def test_jit_value_and_grad_step_compiles_once_for_changing_lengths(monkeypatch):
    rng = np.random.default_rng(1)
    with counting_compiles(monkeypatch) as counter:
        loss, params = make_loss()
        optimizer = nn.SGD(params, learning_rate=1e-2)
        grad_fn = ms.value_and_grad(loss, None, optimizer.parameters)

        @ms.jit
        def train_step(x, actual_seq_len, target):
            value, grads = grad_fn(x, actual_seq_len, target)
            optimizer(grads)
            return value

        for _ in range(STEPS):
            train_step(*batch(rng, 192, 2))
        assert counter.jit_compiles == 1
        inferences = counter.shape_inferences
        train_step(*batch(rng, 192, 3))
        assert counter.jit_compiles == 2 and counter.shape_inferences == 2 * inferences


@pytest.mark.parametrize("as_tensor, expected_compiles", [(True, 1), (False, 3)])
def test_lengths_as_tuples_are_constants(monkeypatch, as_tensor, expected_compiles):
    """The op's lengths may also be tuples: those are graph constants, so each new value compiles."""
    rng = np.random.default_rng(2)

    class Attention(nn.Cell):
        def __init__(self):
            super().__init__()
            self.attention = ms_nsa.nn.NsaSelectAttention(2, BLOCK, COUNT, sparse_mode=2)

        def construct(self, q, k, v, topk_indices, actual_seq_qlen, actual_seq_kvlen):
            return self.attention(q, k, v, topk_indices, actual_seq_qlen, actual_seq_kvlen)

    with counting_compiles(monkeypatch) as counter:
        cell = Attention()
        q, k, v = (Tensor(rng.standard_normal((128, 2, 16)).astype(np.float32)) for _ in range(3))
        topk = Tensor(np.tile(np.arange(COUNT, dtype=np.int32), (128, 2, 1)))
        for cut in (32, 64, 96):
            lengths = (cut, 128)
            lengths = Tensor(np.array(lengths, np.int64)) if as_tensor else lengths
            cell(q, k, v, topk, lengths, lengths)
        assert counter.cell_compiles == expected_compiles
