"""The public API against ops_yaml/: signatures, argument order, and clear errors for bad input."""
import inspect

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

import ms_nsa
from ms_nsa import _cpu_kernels
from ms_nsa.op_def import BACKWARD, FORWARD, load_op_def
from cases import Case
from graph_cells import Forward


@pytest.mark.parametrize("op_name, function", [(FORWARD, ms_nsa.nsa_select_attention),
                                               (BACKWARD, ms_nsa.nsa_select_attention_grad)])
def test_python_signature_is_the_yamls(op_name, function):
    op_def = load_op_def(op_name)
    params = inspect.signature(function).parameters
    positional = [p.name for p in params.values() if p.kind == p.POSITIONAL_OR_KEYWORD]
    keyword = [p.name for p in params.values() if p.kind == p.KEYWORD_ONLY]
    assert function.__name__ == op_def.python["function"]
    assert positional == op_def.python["positional"]
    assert keyword == op_def.python["keyword"]
    for name in keyword:
        assert params[name].default == op_def.arg(name).default
    # every yaml argument reaches Python, except the layout, which is always TND
    assert set(positional + keyword) | {"grad"} >= {a.name for a in op_def.args if a.name != "input_layout"}


def test_signature_is_a_superset_of_mindsporess_own_op():
    # mindspore.ops.nsa_select_attention (r2.8+): same positional order and keywords, plus sparse_mode.
    ours = list(inspect.signature(ms_nsa.nsa_select_attention).parameters)
    theirs = ["query", "key", "value", "topk_indices", "scale_value", "head_num", "select_block_size",
              "select_block_count", "atten_mask", "actual_seq_qlen", "actual_seq_kvlen"]
    assert ours[: len(theirs)] == theirs and ours[len(theirs):] == ["sparse_mode"]


def test_kernel_inputs_follow_the_aclnn_order():
    # The order nsa_aot.cc unpacks (its header comment): the yaml's tensors and int arrays, mask dropped.
    assert _cpu_kernels.kernel_inputs(load_op_def(FORWARD)) == [
        "query", "key", "value", "topk_indices", "actual_seq_qlen", "actual_seq_kvlen"]
    assert _cpu_kernels.kernel_inputs(load_op_def(BACKWARD)) == [
        "query", "key", "value", "attention_out", "grad", "softmax_max", "softmax_sum", "topk_indices",
        "actual_seq_qlen", "actual_seq_kvlen"]
    assert load_op_def(FORWARD).output_names == ["softmax_max", "softmax_sum", "attention_out"]
    assert load_op_def(BACKWARD).output_names == ["dq", "dk", "dv"]
    # functional.py unpacks the kernel's (softmax_max, softmax_sum, attention_out) into the yaml's returns
    forward = load_op_def(FORWARD)
    assert [forward.output_names.index(name) for name in forward.python["returns"]] == [2, 0, 1]


def test_cell_defaults_scale_to_inverse_sqrt_head_dim():
    case = Case(q_lens=(5,), kv_blocks=(3,), head_dim=48).make()
    q, k, v, topk, _ = case.tensors()
    cell_out = ms_nsa.nn.NsaSelectAttention(case.q_heads, case.select_block_size, case.select_block_count)(
        q, k, v, topk)
    fn_out, _, _ = ms_nsa.nsa_select_attention(q, k, v, topk, 48 ** -0.5, case.q_heads, case.select_block_size,
                                               case.select_block_count)
    np.testing.assert_array_equal(cell_out.asnumpy(), fn_out.asnumpy())


GOOD = Case(q_lens=(5, 3), kv_blocks=(3, 2)).make()


def call(mode, overrides=None, q=None, k=None, v=None, topk=None, lengths=None, sparse_mode=0):
    """Calls the forward through a Cell (compiled in GRAPH_MODE) with some arguments replaced."""
    dq, dk, dv, dtopk, _ = GOOD.tensors()
    attrs = dict(zip(("scale_value", "head_num", "select_block_size", "select_block_count"), GOOD.attrs))
    attrs.update(overrides or {})
    cell = Forward(*attrs.values(), sparse_mode=sparse_mode)
    return cell(q if q is not None else dq, k if k is not None else dk, v if v is not None else dv,
                topk if topk is not None else dtopk, **(lengths if lengths is not None else GOOD.lengths()))


BAD_ATTRS = [
    ({"select_block_size": 20}, ValueError, ["select_block_size", "20", "multiple of 16"]),
    ({"select_block_size": 256}, ValueError, ["select_block_size", "256", "[16, 128]"]),
    ({"select_block_count": 0}, ValueError, ["select_block_count", "0", "[1, 32]"]),
    ({"head_num": 3}, ValueError, ["head_num", "3", "N1"]),
    ({"scale_value": "0.5"}, TypeError, ["scale_value", "float"]),
    ({"select_block_size": 16.0}, TypeError, ["select_block_size", "int"]),
]


@pytest.mark.parametrize("overrides, exc, words", BAD_ATTRS)
def test_bad_attributes_raise_clear_errors(mode, overrides, exc, words):
    with pytest.raises(exc) as info:
        call(mode, overrides)
    for word in words:
        assert word in str(info.value)


def test_bad_sparse_mode_raises(mode):
    with pytest.raises(ValueError, match=r"sparse_mode = 1 is not allowed: it must be one of 0, 2"):
        call(mode, sparse_mode=1)


def _bad_inputs():
    q, k, v, topk, _ = GOOD.tensors()
    return [
        (dict(k=k.astype(ms.float16)), TypeError, ["key", "float16", "query"]),
        (dict(q=q[:, :, :16]), ValueError, ["D", "key.shape[2]", "query.shape[2]"]),
        (dict(v=Tensor(np.zeros((v.shape[0], v.shape[1], 64), np.float32))), ValueError, ["Dv", "at most"]),
        (dict(topk=topk.astype(ms.int64)), TypeError, ["topk_indices", "int32"]),
        (dict(topk=topk[:, :, :1]), ValueError, ["topk_indices.shape[2]", "select_block_count"]),
        (dict(q=q.reshape(q.shape[0], -1)), ValueError, ["query", "TND"]),
        (dict(k=Tensor(np.zeros((k.shape[0], 3, k.shape[2]), np.float32)),
              v=Tensor(np.zeros((k.shape[0], 3, v.shape[2]), np.float32)),
              topk=Tensor(np.zeros((q.shape[0], 3, topk.shape[2]), np.int32))),
         ValueError, ["N1 = 4", "multiple of N2 = 3"]),
    ]


@pytest.mark.parametrize("index", range(len(_bad_inputs())))
def test_bad_shapes_and_dtypes_raise_clear_errors(mode, index):
    replaced, exc, words = _bad_inputs()[index]
    with pytest.raises(exc) as info:
        call(mode, **replaced)
    for word in words:
        assert word in str(info.value), str(info.value)


@pytest.mark.parametrize("lengths, words", [
    (dict(actual_seq_qlen=(5, 3), actual_seq_kvlen=(48, 80)), ["actual_seq_qlen[1] = 3", "cumulative"]),
    (dict(actual_seq_qlen=(5, 7), actual_seq_kvlen=(48, 80)), ["actual_seq_qlen", "end at", "8"]),
    (dict(actual_seq_qlen=(5, 8), actual_seq_kvlen=None), ["actual_seq_qlen was given", "actual_seq_kvlen"]),
    (dict(actual_seq_qlen=(5, 8), actual_seq_kvlen=(80,)), ["length of actual_seq_kvlen", "B"]),
])
def test_bad_constant_lengths_raise_clear_errors(mode, lengths, words):
    with pytest.raises(ValueError) as info:
        call(mode, lengths=lengths)
    for word in words:
        assert word in str(info.value), str(info.value)


@pytest.mark.parametrize("change, words", [
    (lambda topk: topk.__setitem__((6, 1, 0), 2), ["topk_indices[6, 1, 0] = 2", "[0, 2)"]),
    (lambda topk: topk.__setitem__((0, 0, 1), -1), ["topk_indices[0, 0, 1] = -1", "out of range"]),
])
def test_out_of_range_indices_raise_in_pynative(change, words):
    topk = GOOD.data["topk"].copy()
    change(topk)
    with pytest.raises(ValueError) as info:
        call("pynative", topk=Tensor(topk))
    for word in words:
        assert word in str(info.value), str(info.value)


def test_kernel_error_in_graph_mode_carries_the_message():
    # Inside a compiled graph the kernel's error cannot become a ValueError (no Python runs there), but
    # MindSpore's RuntimeError carries the kernel's own message.
    topk = GOOD.data["topk"].copy()
    topk[0, 0, 0] = 99
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        with pytest.raises(RuntimeError, match=r"nsa_select_attention: topk_indices\[0, 0, 0\] = 99 is out of "
                                               r"range.*\[0, 3\)"):
            out = call("graph", topk=Tensor(topk))
            out[0].asnumpy()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_bad_kv_length_from_tensor_lengths_raises():
    lengths = dict(actual_seq_qlen=Tensor(np.array([5, 8])), actual_seq_kvlen=Tensor(np.array([40, 80])))
    with pytest.raises(ValueError, match=r"batch 0 has KV length 40.*multiple of select_block_size = 16"):
        call("pynative", lengths=lengths)
