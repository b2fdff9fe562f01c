"""atten_mask (reserved: checked, never read) through every entry point, in PyNative, GRAPH_MODE and @ms.jit.

The mask's checks take only its shape and dtype, so in a graph they must run at compile time; they
once were parsed into the graph instead and failed with `NameError: name 'override' is not defined`."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

import ms_nsa
from cases import Case
from graph_cells import Backward, Forward

CASE = Case(q_lens=(5, 3), kv_blocks=(3, 2), sparse_mode=2).make()
MASKS = {"bool": np.zeros((8, 80), bool), "uint8": np.ones((8, 80), np.uint8)}


def _forward_args():
    q, k, v, topk, _ = CASE.tensors()
    return (q, k, v, topk), CASE.lengths()


def _unmasked_forward():
    (q, k, v, topk), lengths = _forward_args()
    return ms_nsa.nsa_select_attention(q, k, v, topk, *CASE.attrs, sparse_mode=2, **lengths)


def _jit_forward(q, k, v, topk, mask):
    @ms.jit
    def run(q, k, v, topk, mask):
        return ms_nsa.nsa_select_attention(q, k, v, topk, *CASE.attrs, atten_mask=mask, sparse_mode=2,
                                           **CASE.lengths())
    return run(q, k, v, topk, mask)


@pytest.mark.parametrize("mask_dtype", sorted(MASKS))
def test_function_with_mask_in_a_cell(mode, mask_dtype):
    (q, k, v, topk), lengths = _forward_args()
    got = Forward(*CASE.attrs, sparse_mode=2)(q, k, v, topk, lengths["actual_seq_qlen"],
                                               lengths["actual_seq_kvlen"], Tensor(MASKS[mask_dtype]))
    for g, want in zip(got, _unmasked_forward()):
        np.testing.assert_array_equal(g.asnumpy(), want.asnumpy())


@pytest.mark.parametrize("mask_dtype", sorted(MASKS))
def test_function_with_mask_under_jit(mode, mask_dtype):
    (q, k, v, topk), _ = _forward_args()
    got = _jit_forward(q, k, v, topk, Tensor(MASKS[mask_dtype]))
    for g, want in zip(got, _unmasked_forward()):
        np.testing.assert_array_equal(g.asnumpy(), want.asnumpy())


def test_nsa_select_attention_cell_with_mask(mode):
    (q, k, v, topk), lengths = _forward_args()
    cell = ms_nsa.nn.NsaSelectAttention(CASE.q_heads, CASE.select_block_size, CASE.select_block_count,
                                        scale_value=CASE.scale_value, sparse_mode=2)
    got = cell(q, k, v, topk, lengths["actual_seq_qlen"], lengths["actual_seq_kvlen"], Tensor(MASKS["bool"]))
    np.testing.assert_array_equal(got.asnumpy(), _unmasked_forward()[0].asnumpy())


def test_gradient_function_with_mask(mode):
    (q, k, v, topk), lengths = _forward_args()
    out, softmax_max, softmax_sum = _unmasked_forward()
    d_out = CASE.tensors()[4]
    args = (d_out, q, k, v, out, softmax_max, softmax_sum, topk)
    got = Backward(*CASE.attrs, sparse_mode=2)(*args, lengths["actual_seq_qlen"], lengths["actual_seq_kvlen"],
                                                Tensor(MASKS["uint8"]))
    want = ms_nsa.nsa_select_attention_grad(*args, *CASE.attrs, sparse_mode=2, **lengths)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.asnumpy(), w.asnumpy())


@pytest.mark.parametrize("compiled", [False, True], ids=["grad", "jit-grad"])
def test_autodiff_through_the_masked_op(mode, compiled):
    (q, k, v, topk), lengths = _forward_args()
    mask = Tensor(MASKS["bool"])

    def loss(q, k, v, mask):
        out, _, _ = ms_nsa.nsa_select_attention(q, k, v, topk, *CASE.attrs, atten_mask=mask, sparse_mode=2,
                                                **lengths)
        return out.sum()

    def unmasked_loss(q, k, v):
        return _unmasked_forward_of(q, k, v).sum()

    def _unmasked_forward_of(q, k, v):
        return ms_nsa.nsa_select_attention(q, k, v, topk, *CASE.attrs, sparse_mode=2, **lengths)[0]

    grad = ms.grad(loss, grad_position=(0, 1, 2))
    got = (ms.jit(grad) if compiled else grad)(q, k, v, mask)
    want = ms.grad(unmasked_loss, grad_position=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        assert np.abs(g.asnumpy()).sum() > 0
        np.testing.assert_array_equal(g.asnumpy(), w.asnumpy())


@pytest.mark.parametrize("mask, exc, words", [
    (np.zeros((1, 8, 80), bool), ValueError, ["atten_mask must be 2-D", "[1, 8, 80]"]),
    (np.zeros((8, 80), np.float32), TypeError, ["atten_mask has dtype float32", "bool", "uint8"]),
])
def test_bad_masks_fail_at_compile_time_with_the_message(mode, mask, exc, words):
    (q, k, v, topk), lengths = _forward_args()
    with pytest.raises(exc) as info:
        Forward(*CASE.attrs, sparse_mode=2)(q, k, v, topk, lengths["actual_seq_qlen"], lengths["actual_seq_kvlen"],
                                            Tensor(mask))
    for word in words:
        assert word in str(info.value), str(info.value)
    with pytest.raises(exc, match="atten_mask"):
        _jit_forward(q, k, v, topk, Tensor(mask))
