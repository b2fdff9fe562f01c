"""ms_nsa.nn.NativeSparseAttention on the fused ops: loss and every gradient vs MindSpore autodiff of the
same layer in stock ops (ms_nsa.composed_layer), the selection (forced first and local blocks, causal,
inside its sequence), determinism, packed sequences isolated, causality, half precision vs float32,
the rotary embedding, amp training steps, and the layer's errors. PyNative and GRAPH_MODE where it
matters (the `mode` fixture)."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

import ms_nsa
from cases import assert_packed_sequences_isolated, layer_inputs
from ms_nsa.composed_layer import ComposedNativeSparseAttention
from ms_nsa._layer_common import BRANCHES, rotary_constants, rotary_tables, rotate

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, V_HEAD_DIM = 32, 4, 2, 16, 8
# The paper's ratios scaled down: overlapping compression windows (l = 2d), selection blocks of 2l.
CONFIG = dict(compress_block_size=32, compress_stride=16, select_block_size=64, select_block_count=5,
              select_local_blocks=2, window_size=40, value_head_dim=V_HEAD_DIM, init_std=0.3)
BLOCK, COUNT = CONFIG["select_block_size"], CONFIG["select_block_count"]
SEQ_LENS = (320, 448, 384)           # multiples of BLOCK, each >= BLOCK * COUNT
TOKENS = sum(SEQ_LENS)
CU = tuple(int(v) for v in np.cumsum(SEQ_LENS))


def make_layer(cls=ms_nsa.nn.NativeSparseAttention, seed=7, **kwargs):
    options = dict(CONFIG)
    options.update(kwargs)
    layer = cls(HIDDEN, HEADS, KV_HEADS, HEAD_DIM, **options)
    # Deterministic weights whatever the global seed; large enough that attention is far from uniform.
    rng = np.random.default_rng(seed)
    for param in layer.trainable_params():
        if not param.name.startswith("w_compress"):
            param.set_data(Tensor((rng.standard_normal(param.shape) * 0.3).astype(np.float32)))
        else:   # around the window mean, not all equal
            param.set_data(Tensor((1 + rng.standard_normal(param.shape) * 0.5).astype(np.float32) / param.shape[0]))
    return layer


class Loss(nn.Cell):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def construct(self, x, actual_seq_len, d_out):
        return (self.layer(x, actual_seq_len).astype(ms.float32) * d_out).sum()


def inputs(seed=0, seq_lens=SEQ_LENS):
    return layer_inputs(HIDDEN, seq_lens, seed)


def loss_and_grads(layer, x, cu_seq_len, d_out):
    grad_fn = ms.value_and_grad(Loss(layer), grad_position=0, weights=layer.trainable_params())
    value, (dx, d_params) = grad_fn(x, cu_seq_len, d_out)
    return value.asnumpy(), dx.asnumpy(), [g.asnumpy() for g in d_params]


def assert_close_to_scale(got, want, name, rtol=1e-4, atol=1e-5):
    """Elementwise within rtol, or atol of the tensor's largest entry (entries that are sums of
    cancelling terms have no meaningful relative error)."""
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * np.abs(want).max(), err_msg=name)


def rel_error(got, want):
    return float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want))


@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rope"])
def test_gradients_match_autodiff_of_the_stock_op_layer(mode, rope):
    if rope and mode == "graph":
        pytest.skip("rope: PyNative suffices (the same rotation code runs in both layers)")
    x, cu_seq_len, d_out = inputs()
    layer = make_layer(rope=rope)
    reference = make_layer(ComposedNativeSparseAttention, rope=rope, cu_seq_len=CU)
    loss, dx, d_params = loss_and_grads(layer, x, cu_seq_len, d_out)
    ref_loss, ref_dx, ref_d_params = loss_and_grads(reference, x, cu_seq_len, d_out)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_close_to_scale(dx, ref_dx, "x")
    names = [p.name for p in layer.trainable_params()]
    assert len(d_params) == len(ref_d_params) == len(names) == 7
    for name, grad, ref_grad in zip(names, d_params, ref_d_params):
        assert np.abs(grad).max() > 0, f"{name} got no gradient"
        assert_close_to_scale(grad, ref_grad, name)


class Selection(nn.Cell):
    """The compressed branch of `layer` alone: (topk_indices, compressed output)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def construct(self, x, cu_seq_len):
        layer, tokens = self.layer, x.shape[0]
        q = ms.ops.matmul(x, layer.w_q).reshape(tokens, HEADS, HEAD_DIM)
        kv = ms.ops.matmul(x, layer.w_kv).reshape(tokens, len(layer.branches), KV_HEADS, HEAD_DIM + V_HEAD_DIM)
        key, value = layer._kv_slot(kv, 0, None, ms.float32)
        position = ms_nsa._layer_common.sequence_positions(tokens, cu_seq_len)
        out, topk = layer.compressed(q, key, value, cu_seq_len, position)
        return topk, out


def query_rows(seq_lens=SEQ_LENS):
    """(row t, KV head n, t's own block within its sequence, its sequence's block count)."""
    begin = 0
    for seq_len in seq_lens:
        for t in range(begin, begin + seq_len):
            for n in range(KV_HEADS):
                yield t, n, (t - begin) // BLOCK, seq_len // BLOCK
        begin += seq_len


def test_selection_is_causal_inside_its_sequence_and_forces_first_and_local_blocks(mode):
    x, cu_seq_len, _ = inputs(seed=1)
    layer = make_layer()
    topk, _ = Selection(layer)(x, cu_seq_len)
    ref_topk, _ = Selection(make_layer(ComposedNativeSparseAttention, cu_seq_len=CU))(x, cu_seq_len)
    topk, ref_topk = topk.asnumpy(), ref_topk.asnumpy()
    assert topk.shape == (TOKENS, KV_HEADS, COUNT) and topk.dtype == np.int32
    choices = 0
    for t, n, own, blocks in query_rows():
        row = topk[t, n].tolist()
        assert len(set(row)) == COUNT and all(0 <= b < blocks for b in row), (t, n, row)
        assert {0, own, max(own - 1, 0)} <= set(row), (t, n, row)          # first and 2 local blocks
        if own + 1 >= COUNT:         # enough blocks up to its own: never a future one (the backends agree)
            assert max(row) <= own, (t, n, row)
            choices += own + 1 > COUNT
        # The ranking: the stock-op statement picks the same past blocks (future ones are filler).
        past = lambda r: {b for b in r if b <= own}  # noqa: E731
        assert past(row) == past(ref_topk[t, n].tolist()), (t, n, row, ref_topk[t, n])
    assert choices > 100             # rows that really had to choose among their past blocks


def test_deterministic_outputs_and_gradients(mode):
    x, cu_seq_len, d_out = inputs(seed=2)
    layer = make_layer()
    first = loss_and_grads(layer, x, cu_seq_len, d_out)
    ms_nsa.set_num_threads(1)
    try:
        second = loss_and_grads(layer, x, cu_seq_len, d_out)
    finally:
        ms_nsa.set_num_threads(0)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    for a, b in zip(first[2], second[2]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rope"])
def test_packed_sequences_do_not_see_each_other(rope):
    # PyNative only: each sequence alone is a new shape, i.e. a new graph compile per length. With
    # rope, positions restart at every sequence, so the packed result is still each sequence's own.
    x, cu_seq_len, _ = inputs(seed=3)
    layer = make_layer(rope=rope)
    assert_packed_sequences_isolated(layer, x, cu_seq_len, SEQ_LENS)


def test_outputs_do_not_depend_on_later_tokens(mode):
    x, cu_seq_len, _ = inputs(seed=4)
    layer = make_layer()
    for cut in (330, 400, 321):          # inside the second sequence: its first rows, a block boundary, mid-block
        changed = x.asnumpy().copy()
        changed[cut:] = np.random.default_rng(cut).standard_normal(changed[cut:].shape)
        before, after = layer(x, cu_seq_len).asnumpy(), layer(Tensor(changed), cu_seq_len).asnumpy()
        np.testing.assert_array_equal(before[:cut], after[:cut])
        assert not np.allclose(before[cut:], after[cut:])


@pytest.mark.parametrize("dtype, tolerance", [(ms.float16, 4e-3), (ms.bfloat16, 3e-2)], ids=["float16", "bfloat16"])
def test_half_precision_is_close_to_float32(mode, dtype, tolerance):
    # The error of rounding x and q, k, v to the dtype (the ops accumulate in float32); float16 has
    # ~2^-11 relative precision, bfloat16 ~2^-8.
    x, cu_seq_len, d_out = inputs(seed=5)
    layer = make_layer()
    out32 = layer(x, cu_seq_len).asnumpy()
    out = layer(x.astype(dtype), cu_seq_len)
    assert out.dtype == dtype
    assert rel_error(out.astype(ms.float32).asnumpy(), out32) < tolerance
    loss32, dx32, grads32 = loss_and_grads(layer, x, cu_seq_len, d_out)
    loss, dx, grads = loss_and_grads(layer, x.astype(dtype), cu_seq_len, d_out)
    assert np.isfinite(loss) and abs(loss - loss32) < tolerance * np.abs(d_out.asnumpy()).sum() * np.abs(out32).mean()
    assert rel_error(dx.astype(np.float32), dx32) < 2 * tolerance
    for grad, grad32, param in zip(grads, grads32, layer.trainable_params()):
        assert rel_error(grad, grad32) < 2 * tolerance, param.name


def test_rotary_embedding_depends_on_relative_positions_only():
    rng = np.random.default_rng(6)
    q, k = (Tensor(rng.standard_normal((1, 3, HEAD_DIM)).astype(np.float32)) for _ in range(2))
    constants = rotary_constants(HEAD_DIM, 10000.0)

    def score(m, n):
        at = lambda p: rotary_tables(Tensor(np.array([p], np.int32)), constants)  # noqa: E731
        return (rotate(q, at(m)) * rotate(k, at(n))).sum(axis=-1).asnumpy()

    np.testing.assert_allclose(score(7, 3), score(107, 103), rtol=1e-4, atol=1e-5)
    assert not np.allclose(score(7, 3), score(7, 4))
    np.testing.assert_allclose(score(0, 0), (q * k).sum(axis=-1).asnumpy(), rtol=1e-6)   # position 0: identity
    assert not make_layer().rope and make_layer(rope=True).rope                           # off by default


class Model(nn.Cell):
    """Dense -> NativeSparseAttention (residual) -> Dense, mean-square loss: what an amp pass rewrites."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Dense(HIDDEN, HIDDEN)
        self.attention = make_layer()
        self.head = nn.Dense(HIDDEN, HIDDEN)

    def construct(self, x, cu_seq_len, target):
        h = self.embed(x)
        out = self.head(h + self.attention(h, cu_seq_len))
        return ((out.astype(ms.float32) - target) ** 2).mean()


@pytest.mark.parametrize("level, wrapper", [("O1", "auto_mixed_precision"), ("O2", "auto_mixed_precision"),
                                            ("O2", "build_train_network")])
def test_amp_training_steps_run(mode, level, wrapper, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # O1's source rewrite writes the rewritten network to ./rewritten_network
    x, cu_seq_len, target = inputs(seed=8)
    model = Model()
    before = model.attention.w_q.asnumpy().copy()
    if wrapper == "auto_mixed_precision":
        net = ms.amp.auto_mixed_precision(model, level)
        step = nn.TrainOneStepCell(net, nn.SGD(net.trainable_params(), learning_rate=0.1))
    else:                                # on the CPU MindSpore allows no dynamic loss scale
        net = model
        step = ms.amp.build_train_network(model, nn.SGD(model.trainable_params(), learning_rate=0.1), level=level,
                                          loss_scale_manager=None)
    losses = [float(step(x, cu_seq_len, target).asnumpy()) for _ in range(3)]
    assert np.isfinite(losses).all(), losses
    assert losses[-1] < losses[0], losses
    w_q = [p for p in net.trainable_params() if p.name.endswith("w_q")]
    assert len(w_q) == 1 and not np.array_equal(w_q[0].asnumpy(), before)


@pytest.mark.parametrize("branches", [("window",), ("compressed", "window"), ("selected", "compressed")])
def test_branch_subsets(mode, branches):
    layer = make_layer(branches=branches)
    x, cu_seq_len, _ = inputs()
    out = layer(x, cu_seq_len)
    assert out.shape == (TOKENS, HIDDEN) and np.isfinite(out.asnumpy()).all()
    assert layer.branches == tuple(b for b in BRANCHES if b in branches)


def test_defaults_are_the_papers_configuration():
    layer = ms_nsa.nn.NativeSparseAttention(256, 4, 2, 64)
    assert (layer.compress_block_size, layer.compress_stride, layer.select_block_size, layer.select_block_count,
            layer.select_local_blocks, layer.window_size, layer.branches) == (32, 16, 64, 16, 2, 512, BRANCHES)


# -- errors: each names the argument, its value and what to do ------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    (dict(value_head_dim=32), ValueError, r"value_head_dim = 32 is larger than head_dim = 16.*at most 16"),
    (dict(branches=("selected", "window")), ValueError, "add 'compressed'"),
    (dict(branches=("global",)), ValueError, "branches must be"),
    (dict(select_block_count=2), ValueError, r"select_block_count = 2 leaves no room.*at least 3"),
    (dict(compress_stride=24), ValueError, r"outside what nsa_compress supports.*compress_stride = 24"),
    (dict(compress_stride=64), ValueError, r"compress_stride = 64 must be at most compress_block_size = 32"),
    (dict(compress_stride=32, select_block_size=80), ValueError,
     r"select_block_size = 80 must be a multiple of compress_stride = 32"),
    (dict(select_block_size=16), ValueError, r"select_block_size = 16 must be at least compress_block_size"),
    (dict(select_block_count=40), ValueError, r"select_block_count = 40 is not allowed"),
    (dict(window_size=0), ValueError, r"window_size = 0 is not allowed"),
    (dict(rope=True, rope_base=0.5), ValueError, "rope_base"),
])
def test_bad_configurations_raise(kwargs, error, message):
    with pytest.raises(error, match=message):
        make_layer(**kwargs)


def test_bad_head_counts_raise():
    with pytest.raises(ValueError, match=r"head_num = 4 must be a multiple of kv_head_num = 3"):
        ms_nsa.nn.NativeSparseAttention(HIDDEN, 4, 3, HEAD_DIM)
    with pytest.raises(ValueError, match=r"rope=True .* head_dim must be even, got head_dim = 15"):
        ms_nsa.nn.NativeSparseAttention(HIDDEN, 4, 2, 15, rope=True)
    with pytest.raises(ValueError, match=r"G = 64 \(from N1/N2\) is not supported on cpu"):
        ms_nsa.nn.NativeSparseAttention(HIDDEN, 64, 1, HEAD_DIM)      # the selected op's G <= 32


@pytest.mark.parametrize("lengths, error, message", [
    ((320, 1152), TypeError, r"actual_seq_len must be a 1-D int32/int64 Tensor .* got tuple \(320, 1152\).*Tensor"),
    ([320, 1152], TypeError, r"got list \[320, 1152\]"),
    (Tensor(np.array([320.0, 1152.0], np.float32)), TypeError, r"got a 1-D Tensor of Float32: pass Tensor"),
    (Tensor(np.array([[320, 1152]], np.int64)), TypeError, r"got a 2-D Tensor of Int64"),
])
def test_bad_length_types_raise(mode, lengths, error, message):
    layer = make_layer()
    with pytest.raises(error, match=message):
        layer(inputs()[0], lengths)


def test_three_dimensional_input_raises(mode):
    layer = make_layer()
    with pytest.raises(ValueError, match=r"x must be 2-D \[T, hidden_size\].*got shape \(2, 576, 32\).*"
                                         r"x.reshape\(1152, 32\)"):
        layer(Tensor(np.zeros((2, 576, HIDDEN), np.float32)), None)
    with pytest.raises(ValueError, match=r"x.shape\[1\] = 16 must equal hidden_size = 32"):
        layer(Tensor(np.zeros((TOKENS, 16), np.float32)), None)


def test_token_counts_outside_the_layer_raise_at_compile_time(mode):
    layer = make_layer()
    with pytest.raises(ValueError, match=r"T = 1120 \(x.shape\[0\]\) must be a multiple of select_block_size = 64"):
        layer(Tensor(np.zeros((1120, HIDDEN), np.float32)), None)
    with pytest.raises(ValueError, match=r"T = 256 \(x.shape\[0\]\) is less than select_block_size \* "
                                         r"select_block_count = 64 \* 5 = 320"):
        layer(Tensor(np.zeros((256, HIDDEN), np.float32)), None)
    window_only = make_layer(branches=("window",))                 # no block rule for the window branch
    assert window_only(Tensor(np.zeros((100, HIDDEN), np.float32)), None).shape == (100, HIDDEN)


@pytest.mark.parametrize("seq_lens, message", [
    ((256, 576, 320), r"gives sequence 0 a length of 256; every sequence must be a multiple of select_block_size "
                      r"= 64 and at least .* = 320 tokens"),
    ((352, 416, 384), r"gives sequence 0 a length of 352"),
    ((384, 384, 384), None),
])
def test_short_or_ragged_sequences_raise_the_layers_error_in_pynative(seq_lens, message):
    layer = make_layer()
    x = Tensor(np.zeros((sum(seq_lens), HIDDEN), np.float32))
    cu = Tensor(np.cumsum(seq_lens).astype(np.int64))
    if message is None:
        assert layer(x, cu).shape == (sum(seq_lens), HIDDEN)
        return
    with pytest.raises(ValueError, match=message):
        layer(x, cu)
    with pytest.raises(ValueError, match=message):      # what a graph-mode user calls before a run
        layer.check_lengths(cu, sum(seq_lens))
    with pytest.raises(ValueError, match=r"cumulative lengths.*running sum \[320, 768, 1152\]"):
        layer.check_lengths(Tensor(np.array([320, 448, 384])), 1152)


def test_short_sequences_in_graph_mode_fail_in_a_kernel():
    # GRAPH_MODE compiles without the length values: the first kernel to read them reports the problem.
    layer = make_layer()
    loss = Loss(layer)
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        with pytest.raises(RuntimeError, match="nsa_compress_attention|nsa_select_attention|nsa_compress"):
            loss(Tensor(np.zeros((1152, HIDDEN), np.float32)), Tensor(np.array([256, 832, 1152], np.int64)),
                 Tensor(np.zeros((1152, HIDDEN), np.float32))).asnumpy()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
