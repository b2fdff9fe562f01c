"""ms_nsa.nn.EqualBlocksNativeSparseAttention (the earlier stock-op layer, kept as the benchmark baseline
and for Ascend): gradients vs autodiff of a composed reference, the block selection, varlen isolation
and causality, in PyNative and GRAPH_MODE (the `mode` fixture)."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn, ops

import ms_nsa
from cases import assert_packed_sequences_isolated, layer_inputs
from ms_nsa.composed import composed_forward

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, V_HEAD_DIM = 32, 4, 2, 16, 8
BLOCK, COUNT, WINDOW = 16, 3, 20
SEQ_LENS = (48, 80, 48)          # multiples of BLOCK, each >= BLOCK * COUNT
TOKENS = sum(SEQ_LENS)


def make_layer(cls=ms_nsa.nn.EqualBlocksNativeSparseAttention, **kwargs):
    options = dict(select_block_size=BLOCK, select_block_count=COUNT, window_size=WINDOW,
                   value_head_dim=V_HEAD_DIM, init_std=0.3)
    options.update(kwargs)
    layer = cls(HIDDEN, HEADS, KV_HEADS, HEAD_DIM, **options)
    # Deterministic weights whatever the global seed; large enough that attention is far from uniform.
    rng = np.random.default_rng(7)
    for param in layer.trainable_params():
        param.set_data(Tensor((rng.standard_normal(param.shape) * 0.3).astype(np.float32)))
    return layer


class ComposedSelection(ms_nsa.nn.EqualBlocksNativeSparseAttention):
    """The same layer with the selected branch written in stock ops (ms_nsa.composed), so that
    MindSpore autodiff, not our bprop, differentiates it."""

    def selected(self, q, key, value, topk_indices, seq, actual_seq_len):
        tokens, start = q.shape[0], seq[2]
        position = ops.arange(tokens, dtype=ms.int32) - start
        out = composed_forward(q.reshape(tokens, self.head_num, self.head_dim), key, value, topk_indices,
                               self.scale, self.block, start.reshape(tokens, 1, 1),
                               position.reshape(tokens, 1, 1), sparse_mode=2)
        return out.reshape(tokens, self.kv_head_num, self.group, self.value_head_dim)


class Loss(nn.Cell):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def construct(self, x, actual_seq_len, d_out):
        return (self.layer(x, actual_seq_len) * d_out).sum()


def inputs(seed=0, seq_lens=SEQ_LENS):
    return layer_inputs(HIDDEN, seq_lens, seed)


def loss_and_grads(layer, x, cu_seq_len, d_out):
    loss = Loss(layer)
    grad_fn = ms.value_and_grad(loss, grad_position=0, weights=layer.trainable_params())
    value, (dx, d_params) = grad_fn(x, cu_seq_len, d_out)
    return value.asnumpy(), dx.asnumpy(), [g.asnumpy() for g in d_params]


def test_gradients_match_autodiff_of_composed_reference(mode):
    x, cu_seq_len, d_out = inputs()
    layer = make_layer()
    reference = make_layer(ComposedSelection)
    loss, dx, d_params = loss_and_grads(layer, x, cu_seq_len, d_out)
    ref_loss, ref_dx, ref_d_params = loss_and_grads(reference, x, cu_seq_len, d_out)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_close_to_scale(dx, ref_dx, "x")
    names = [p.name for p in layer.trainable_params()]
    assert len(d_params) == len(ref_d_params) == len(names)
    for name, grad, ref_grad in zip(names, d_params, ref_d_params):
        assert np.abs(grad).max() > 0, f"{name} got no gradient"
        assert_close_to_scale(grad, ref_grad, name)


def assert_close_to_scale(got, want, name):
    """float32 agreement: elementwise within 1e-4 relative, or 1e-5 of the tensor's largest entry
    (entries that are sums of cancelling terms have no meaningful relative error)."""
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=name)


def query_rows(seq_lens):
    """(row t, KV head n, first block of t's sequence, t's own block, sequence length), global blocks."""
    begin = 0
    for seq_len in seq_lens:
        for t in range(begin, begin + seq_len):
            for n in range(KV_HEADS):
                yield t, n, begin // BLOCK, t // BLOCK, seq_len
        begin += seq_len


def expected_selection(block_probs, seq_lens):
    """NumPy statement of the rule: per query and KV group, the first and own blocks, then the past
    blocks of highest summed compressed probability; future blocks only to fill up the count."""
    importance = block_probs.sum(axis=2)                      # [T, N2, blocks]
    picks = {}
    for t, n, first, own, _ in query_rows(seq_lens):
        past = sorted(range(first + 1, own), key=lambda b: -importance[t, n, b])
        forced = {first, own}
        picks[t, n] = (forced, set(past[:COUNT - len(forced)]))
    return picks


def test_block_selection(mode):
    x, cu_seq_len, _ = inputs(seed=1)
    layer = make_layer()

    class Selection(nn.Cell):
        def construct(self, x, actual_seq_len):
            tokens = x.shape[0]
            seq = ms_nsa.nsa_layer_equal_blocks._sequence_geometry(tokens, actual_seq_len, BLOCK)
            q = ops.matmul(x, layer.w_q).reshape(tokens, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
            key, value = layer._kv_slot(ops.matmul(x, layer.w_kv).reshape(tokens, 3, KV_HEADS, -1), 0)
            _, block_probs = layer.compressed(q, key, value, seq)
            return layer.select_blocks(block_probs, seq), block_probs

    topk, block_probs = (t.asnumpy() for t in Selection()(x, cu_seq_len))
    assert topk.shape == (TOKENS, KV_HEADS, COUNT) and topk.dtype == np.int32
    expected = expected_selection(block_probs, SEQ_LENS)
    for t, n, first, own, seq_len in query_rows(SEQ_LENS):
        chosen = set((topk[t, n] + first).tolist())       # back to global block numbers
        forced, best_past = expected[t, n]
        assert len(chosen) == COUNT, f"row {t}: repeated blocks {topk[t, n]}"
        assert all(0 <= i < seq_len // BLOCK for i in topk[t, n]), f"row {t}: {topk[t, n]} out of range"
        assert forced <= chosen and best_past <= chosen, (t, n, topk[t, n])
        future = {b for b in chosen if b > own}
        assert len(future) == COUNT - len(forced | best_past), (t, n, topk[t, n])


def test_packed_sequences_do_not_see_each_other():
    # PyNative only: each sequence alone is a new shape, i.e. a new graph compile per length.
    x, cu_seq_len, _ = inputs(seed=2)
    layer = make_layer()
    assert_packed_sequences_isolated(layer, x, cu_seq_len, SEQ_LENS)


def test_outputs_do_not_depend_on_future_tokens(mode):
    x, cu_seq_len, _ = inputs(seed=3)
    layer = make_layer()
    cut = 100                                  # inside the second sequence, not on a block boundary
    changed = x.asnumpy().copy()
    changed[cut:] = np.random.default_rng(4).standard_normal(changed[cut:].shape)
    before, after = layer(x, cu_seq_len).asnumpy(), layer(Tensor(changed), cu_seq_len).asnumpy()
    np.testing.assert_allclose(before[:cut], after[:cut], rtol=1e-5, atol=1e-6)
    assert not np.allclose(before[cut:], after[cut:])


@pytest.mark.parametrize("branches", [("window",), ("compressed", "window"), ("selected", "compressed")])
def test_branch_subsets(branches):
    layer = make_layer(branches=branches)
    x, cu_seq_len, _ = inputs()
    out = layer(x, cu_seq_len)
    assert out.shape == (TOKENS, HIDDEN) and np.isfinite(out.asnumpy()).all()
    assert layer.branches == tuple(b for b in ms_nsa.nsa_layer.BRANCHES if b in branches)


@pytest.mark.parametrize("kwargs, message", [
    (dict(branches=("selected", "window")), "add 'compressed'"),
    (dict(branches=("global",)), "branches must be"),
    (dict(select_block_size=24), "select_block_size"),
    (dict(window_size=0), "window_size"),
])
def test_bad_configurations_raise(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make_layer(**kwargs)


def test_tokens_must_fill_whole_blocks(mode):
    layer = make_layer()
    x = Tensor(np.zeros((TOKENS - 8, HIDDEN), np.float32))
    with pytest.raises(ValueError, match="multiple of select_block_size"):
        layer(x, Tensor(np.array([TOKENS - 8], np.int64)))
