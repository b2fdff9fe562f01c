"""ms_nsa.check_inputs raises exactly what a call raises; the cumulative-length hints; the graph-mode
"dead Cell after a data error" behaviour docs/errors.md describes, and its recovery."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, mint, nn

import ms_nsa
from cases import Case
from graph_cells import Forward

GOOD = Case(q_lens=(5, 3), kv_blocks=(3, 2)).make()


def _topk_with(index, value):
    topk = GOOD.data["topk"].copy()
    topk[index] = value
    return Tensor(topk)


def _lengths(q, kv):
    return dict(actual_seq_qlen=Tensor(np.array(q, np.int64)), actual_seq_kvlen=Tensor(np.array(kv, np.int64)))


# (replaced arguments, exception, words): data errors (the kernel's checks) and constant errors.
BAD = [
    (dict(topk_indices=_topk_with((6, 1, 0), 2)), ValueError, ["topk_indices[6, 1, 0] = 2", "[0, 2)"]),
    (dict(topk_indices=_topk_with((0, 0, 1), -1)), ValueError, ["topk_indices[0, 0, 1] = -1"]),
    (_lengths((5, 8), (40, 80)), ValueError, ["batch 0 has KV length 40"]),
    (_lengths((5, 3), (48, 80)), ValueError, ["actual_seq_qlen[1] = 3", "running sum: [5, 8]"]),
    (_lengths((5, 8), (48, 32)), ValueError, ["actual_seq_kvlen[1] = 32", "running sum: [48, 80]"]),
    (_lengths((5, 8), (48, 81)), ValueError, ["actual_seq_kvlen[-1] = 81 must equal T2 = 80", "cumulative"]),
    (dict(actual_seq_qlen=(5, 3), actual_seq_kvlen=(48, 80)), ValueError, ["did you mean (5, 8)?"]),
    (dict(actual_seq_qlen=(5, 8), actual_seq_kvlen=(32, 48)), ValueError, ["end at the token count 80",
                                                                          "cumulative", "did you mean (32, 80)?"]),
    (dict(select_block_size=20), ValueError, ["select_block_size = 20"]),
    (dict(query=Tensor(np.zeros((8, 4, 16), np.float32))), ValueError, ["key.shape[2]", "query.shape[2]"]),
    (dict(atten_mask=Tensor(np.zeros((8, 80), np.float32))), TypeError, ["atten_mask has dtype float32"]),
]


def _arguments(replaced):
    q, k, v, topk, _ = GOOD.tensors()
    args = dict(query=q, key=k, value=v, topk_indices=topk, scale_value=GOOD.scale_value, head_num=GOOD.q_heads,
                select_block_size=GOOD.select_block_size, select_block_count=GOOD.select_block_count,
                atten_mask=None, sparse_mode=0, **GOOD.lengths())
    args.update(replaced)
    return args


def test_valid_inputs_pass():
    assert ms_nsa.check_inputs(**_arguments({})) is None
    assert ms_nsa.check_inputs(**_arguments(GOOD.lengths(as_tensor=True))) is None


@pytest.mark.parametrize("index", range(len(BAD)))
def test_check_inputs_raises_what_the_call_raises(index):
    replaced, exc, words = BAD[index]
    with pytest.raises(exc) as checked:
        ms_nsa.check_inputs(**_arguments(replaced))
    for word in words:
        assert word in str(checked.value), str(checked.value)
    with pytest.raises(exc) as called:
        ms_nsa.nsa_select_attention(**_arguments(replaced))
    assert str(called.value) == str(checked.value)


def test_tuple_lengths_that_are_not_per_batch_get_no_running_sum_hint():
    with pytest.raises(ValueError) as info:
        ms_nsa.check_inputs(**_arguments(dict(actual_seq_qlen=(5, 7), actual_seq_kvlen=(48, 80))))
    assert "cumulative" in str(info.value) and "did you mean" not in str(info.value)


class _Loss(nn.Cell):
    def __init__(self):
        super().__init__()
        self.scale = ms.Parameter(Tensor(np.ones((1,), np.float32)), name="scale")
        self.attention = Forward(*GOOD.attrs)

    def construct(self, query, key, value, topk_indices):
        return self.attention(query * self.scale, key, value, topk_indices, *GOOD.lengths().values())[0].sum()


def test_graph_mode_cell_refuses_calls_after_a_data_error_and_a_new_wrapper_recovers():
    q, k, v, topk, _ = GOOD.tensors()
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        loss = _Loss()
        step = nn.TrainOneStepCell(loss, mint.optim.Adam(loss.trainable_params(), lr=0.1))
        step(q, k, v, topk).asnumpy()
        after_good_step = loss.scale.asnumpy().copy()
        with pytest.raises(RuntimeError, match=r"topk_indices\[6, 1, 0\] = 2 is out of range"):
            step(q, k, v, _topk_with((6, 1, 0), 2)).asnumpy()
        with pytest.raises(RuntimeError, match="An error occurred in the previous step of this model execution"):
            step(q, k, v, topk).asnumpy()
        # The failed step changed nothing; a new wrapper around the same model and optimizer trains on.
        np.testing.assert_array_equal(loss.scale.asnumpy(), after_good_step)
        nn.TrainOneStepCell(loss, step.optimizer)(q, k, v, topk).asnumpy()
        assert loss.scale.asnumpy()[0] != after_good_step[0]
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_layer_with_fewer_tokens_than_its_selection_raises_a_clear_error(mode):
    # Used to surface as MindSpore's "For primitive[TopK], the k must be in (0,12], but got 16".
    layer = ms_nsa.nn.NativeSparseAttention(hidden_size=64, head_num=4, kv_head_num=2, head_dim=16)
    with pytest.raises(ValueError, match=r"token count T = 768 \(x.shape\[0\]\) is less than select_block_size \* "
                                         r"select_block_count = 64 \* 16 = 1024"):
        layer(Tensor(np.zeros((768, 64), np.float32)), Tensor(np.array([768])))
    window_only = ms_nsa.nn.NativeSparseAttention(hidden_size=64, head_num=4, kv_head_num=2, head_dim=16,
                                                  branches=("window",))
    assert window_only(Tensor(np.zeros((128, 64), np.float32)), Tensor(np.array([128]))).shape == (128, 64)
