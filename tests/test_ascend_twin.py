"""The Ascend backend through MindSpore's own compiler and autodiff, on this CPU: the Ascend twin.

MS_NSA_BACKEND=ascend_twin builds the Ascend backend's ops (ms_nsa/_ascend_kernels.py: reg_info, call
order, bprop, ms.jit call) for the CPU device target, with a stand-in for CANN's aclnn library
(custom_aot/twin/) reached through the callback MindSpore generates from the aclnn headers. The stand-in
records every argument it receives and computes CANN's results (its mask rules) with the CPU core.
What the twin cannot show (the NPU runtime, CANN's kernels themselves) is listed in docs/ascend.md.
"""
from __future__ import annotations

import ctypes
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

import ms_nsa
from cases import REL_TOL, Case, OutputLoss, rel_error, to_numpy
from ms_nsa import _ascend_kernels as ascend
from ms_nsa import _backend, reference
from ms_nsa.op_def import BACKWARD, FORWARD, load_op_def

ROOT = Path(__file__).resolve().parent.parent


# -- the record ---------------------------------------------------------------------------------------
class Record:
    """The stand-in's record of aclnn calls: [(aclnn name, [one line per argument])]."""

    def __init__(self):
        self.lib = ctypes.CDLL(ascend.twin_library())   # the library MindSpore loaded: same globals
        self.lib.ms_nsa_twin_record.restype = ctypes.c_char_p

    def clear(self):
        self.lib.ms_nsa_twin_clear_record()

    def calls(self):
        calls = []
        for line in self.lib.ms_nsa_twin_record().decode().splitlines():
            if line.startswith("call "):
                calls.append((line[len("call "):], []))
            else:
                calls[-1][1].append(line)
        return calls


@pytest.fixture
def twin(monkeypatch):
    monkeypatch.setenv(_backend.BACKEND_ENV, "ascend_twin")
    record = Record()
    record.clear()
    return record


def _use(monkeypatch, backend):
    monkeypatch.setenv(_backend.BACKEND_ENV, backend)


# What the prototypes (spec §5) say each position receives, typed out by hand from the spec, not from
# the yaml: a moved, dropped, retyped or attr-ified argument shows up here.
def _tensor(dtype, *shape):
    return f"tensor {dtype} " + "x".join(map(str, shape))


def _forward_record(case, sparse_mode):
    t1, t2, n1, n2 = sum(case.q_lens), sum(case.kv_lens), case.q_heads, case.kv_heads
    dt, d, dv, c = case.dtype, case.head_dim, case.v_head_dim, case.select_block_count
    return [_tensor(dt, t1, n1, d),                                   # query
            _tensor(dt, t2, n2, d),                                   # key
            _tensor(dt, t2, n2, dv),                                  # value
            _tensor("int32", t1, n2, c),                              # topkIndices
            _tensor("bool", 2048, 2048) if sparse_mode == 2 else "null",  # attenMaskOptional
            "int_array " + ",".join(map(str, case.actual_seq_qlen)),  # actualSeqQLenOptional
            "int_array " + ",".join(map(str, case.actual_seq_kvlen)),  # actualSeqKvLenOptional
            f"double {float(np.float32(case.scale_value)):.17g}",    # scaleValue
            f"int {n1}",                                              # headNum
            "str TND",                                                # inputLayout
            f"int {sparse_mode}",                                     # sparseMode
            f"int {case.select_block_size}",                          # selectedBlockSize
            f"int {c}",                                               # selectedBlockCount
            _tensor("float32", t1, n1, 8),                            # softmaxMaxOut
            _tensor("float32", t1, n1, 8),                            # softmaxSumOut
            _tensor(dt, t1, n1, dv),                                  # attentionOut
            "workspace_size", "executor"]


def _grad_record(case, sparse_mode):
    f = _forward_record(case, sparse_mode)
    query, key, value, topk, mask, cu_q, cu_kv, scale, heads, layout, mode, size, count, m, l, out = f[:16]
    return [query, key, value, out,                   # query, key, value, attentionOut
            out,                                      # attentionOutGrad
            m, l, topk,                               # softmaxMax, softmaxSum, topkIndices
            cu_q, cu_kv, mask,                        # actualSeqQLenOptional, actualSeqKvLenOptional, attenMaskOptional
            scale, size, count, heads, layout, mode,  # scaleValue, selectedBlockSize/Count, headNum, layout, mode
            query, key, value,                        # dqOut, dkOut, dvOut
            "workspace_size", "executor"]


def test_expected_records_have_the_prototypes_lengths():
    case = _case("float16", 2)
    assert len(_forward_record(case, 2)) == 18 and len(_grad_record(case, 2)) == 22


# -- forward and gradient through the Cell -------------------------------------------------------------
def _case(dtype, sparse_mode, **overrides):
    """Varlen (lengths 6, 40 over 2 and 3 blocks), G = 2, CANN's head dims, NSA-shaped unsorted rows."""
    fields = dict(q_lens=(6, 40), kv_blocks=(2, 3), q_heads=2, kv_heads=1, head_dim=128, v_head_dim=128,
                  select_block_size=16, select_block_count=2, sparse_mode=sparse_mode, dtype=dtype,
                  nsa_shaped=True)
    fields.update(overrides)
    return Case(**fields).make()


def _run(case):
    """(attention_out, dq, dk, dv) through the Cell and ms.grad, as float64 arrays."""
    q, k, v, topk, d_out = case.tensors()
    (_, out), grads = ms.value_and_grad(OutputLoss(case), grad_position=(0, 1, 2), has_aux=True)(q, k, v, topk, d_out)
    return [to_numpy(x) for x in (out,) + tuple(grads)]


def _references(case, cann):
    d = case.data
    forward, backward = (reference.cann_forward, reference.cann_backward) if cann else \
        (reference.forward, reference.backward)
    # The Ascend path sorts each row before the aclnn call; CANN's rules see the sorted rows.
    topk = np.sort(d["topk"], axis=-1) if cann else d["topk"]
    mask = ascend.causal_mask() if case.sparse_mode == 2 else None
    kwargs = dict(atten_mask=mask, sparse_mode=case.sparse_mode, **case.lengths())
    out = forward(d["q"], d["k"], d["v"], topk, *case.attrs, **kwargs)
    return [out[0]] + list(backward(d["d_out"], d["q"], d["k"], d["v"], *out, topk, *case.attrs, **kwargs))


def agreement(got, want):
    """(max abs error, max error relative to the largest magnitude) over all outputs."""
    return (max(float(np.abs(g - w).max()) for g, w in zip(got, want)),
            max(float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-30)) for g, w in zip(got, want)))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("sparse_mode", [0, 2])
def test_twin_forward_and_gradient(sparse_mode, dtype, mode, twin, monkeypatch):
    case = _case(dtype, sparse_mode)
    got = _run(case)

    # Every aclnn argument reached the stand-in, in prototype order, once per pass.
    calls = twin.calls()
    assert [name for name, _ in calls] == ["aclnnNsaSelectedAttention", "aclnnNsaSelectedAttentionGrad"]
    assert calls[0][1] == _forward_record(case, sparse_mode)
    assert calls[1][1] == _grad_record(case, sparse_mode)

    # CANN's results (the stand-in's rules) and ms_nsa's definition: equal on this input (NSA-shaped rows).
    labels = ("attention_out", "dq", "dk", "dv")
    for cann in (True, False):
        for label, g, w in zip(labels, got, _references(case, cann)):
            err = rel_error(g, w)
            assert err < 2 * REL_TOL[dtype], f"{label} vs {'CANN' if cann else 'ms_nsa'} reference: {err:.2e}"

    # And the CPU backend on the same input.
    _use(monkeypatch, "cpu")
    cpu = _run(case)
    for label, g, w in zip(labels, got, cpu):
        assert rel_error(g, w) < REL_TOL[dtype], f"{label}: twin vs CPU backend {rel_error(g, w):.2e}"
    max_abs, max_rel = agreement(got, cpu)
    print(f"\n[twin vs cpu] {dtype} sparse_mode={sparse_mode} {mode}: max abs {max_abs:.3e}, max rel {max_rel:.3e}")


def test_twin_follows_cann_where_the_backends_differ(mode, twin):
    """Rows outside the agreeing set: the twin computes CANN's results, not ms_nsa's."""
    # Late rows (s + 1 >= β·C) selecting their own block and a future one: CANN's forward masks the
    # future block, its backward does not. The other rows are in the agreeing set.
    case = _case("float16", 2, kv_blocks=(2, 4), nsa_shaped=False)
    topk = case.data["topk"]
    topk[:6, 0] = (1, 0)
    for s in range(40):
        topk[6 + s, 0] = (1, 0) if s < 16 else (0, 1) if s < 32 else (2, 3)
    got = _run(case)
    cann, ours = _references(case, cann=True), _references(case, cann=False)
    assert rel_error(got[0], ours[0]) < REL_TOL["float16"]          # forward: the same rule
    for g, w, o in zip(got[1:], cann[1:], ours[1:]):
        assert rel_error(g, w) < 2 * REL_TOL["float16"]
        assert rel_error(w, o) > 10 * REL_TOL["float16"]            # and CANN's gradient is not ours
    # A row that sees no key (every selected block in its future): CANN averages, ms_nsa returns zeros.
    blind = _case("float16", 2, nsa_shaped=False)
    blind.data["topk"][0, 0] = (1, 1)
    q, k, v, topk_t, _ = blind.tensors()
    out, _, _ = ms_nsa.nsa_select_attention(q, k, v, topk_t, *blind.attrs, sparse_mode=2, **blind.lengths())
    want = _references(blind, cann=True)[0]
    assert rel_error(to_numpy(out), want) < REL_TOL["float16"]
    np.testing.assert_allclose(to_numpy(out)[0], blind.data["v"][16:32, 0].mean(axis=0)[None, :].repeat(2, 0),
                               rtol=2e-3, atol=2e-3)


# -- training through the Cell and through the equal-blocks layer --------------------------------------
# (EqualBlocksNativeSparseAttention: the layer whose only fused op is the selected one, so it runs on
# the Ascend backend; NativeSparseAttention's other ops have no Ascend side yet.)
class _Projected(nn.Cell):
    """q = x W (a trainable float32 W), then the op in float16; loss = mean(out²)."""

    def __init__(self, case, weight):
        super().__init__()
        self.case = case
        self.weight = Parameter(Tensor(weight), name="weight")
        self.attn = ms_nsa.nn.NsaSelectAttention(case.q_heads, case.select_block_size, case.select_block_count,
                                                 sparse_mode=2)

    def construct(self, x, k, v, topk):
        q = ops.matmul(x, self.weight).astype(ms.float16)
        out = self.attn(q, k, v, topk, self.case.actual_seq_qlen, self.case.actual_seq_kvlen)
        return out.astype(ms.float32).square().mean()


def _train(case, steps=2):
    rng = np.random.default_rng(1)
    weight = (rng.standard_normal((case.head_dim, case.head_dim)) / case.head_dim ** 0.5).astype(np.float32)
    x = Tensor(case.data["q"])
    _, k, v, topk, _ = case.tensors()
    net = _Projected(case, weight)
    loss, grads = ms.value_and_grad(net, None, net.trainable_params())(x, k, v, topk)
    plain = ms.grad(net, None, net.trainable_params())(x, k, v, topk)
    np.testing.assert_array_equal(plain[0].asnumpy(), grads[0].asnumpy())
    step = nn.TrainOneStepCell(net, nn.SGD(net.trainable_params(), learning_rate=10.0))
    losses = [float(step(x, k, v, topk).asnumpy()) for _ in range(steps)]
    return float(loss.asnumpy()), grads[0].asnumpy(), losses, net.weight.asnumpy()


def test_twin_trains_like_the_cpu_backend(mode, twin, monkeypatch):
    case = _case("float16", 2)
    twin_loss, twin_grad, twin_losses, twin_weight = _train(case)
    assert twin.calls(), "the twin's stand-in was not called"
    _use(monkeypatch, "cpu")
    cpu_loss, cpu_grad, cpu_losses, cpu_weight = _train(case)
    assert abs(twin_loss - cpu_loss) <= 1e-3 * abs(cpu_loss)
    assert rel_error(twin_grad, cpu_grad) < REL_TOL["float16"]
    assert np.abs(twin_grad).max() > 0
    np.testing.assert_allclose(twin_losses, cpu_losses, rtol=1e-3)
    assert twin_losses[1] < twin_losses[0]
    assert rel_error(twin_weight, cpu_weight) < 1e-3


class _LayerLoss(nn.Cell):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def construct(self, x):
        return self.layer(x, (32, 64)).square().mean()


def _nsa_layer_grads(weights=None):
    """EqualBlocksNativeSparseAttention (two sequences of 32 tokens, the op in float16): loss and gradients."""
    layer = ms_nsa.nn.EqualBlocksNativeSparseAttention(hidden_size=32, head_num=2, kv_head_num=1, head_dim=128,
                                                       select_block_size=16, select_block_count=2, window_size=16,
                                                       select_dtype=ms.float16)
    params = layer.trainable_params()
    if weights is not None:
        for param, value in zip(params, weights):
            param.set_data(Tensor(value))
    x = Tensor(np.random.default_rng(2).standard_normal((64, 32)).astype(np.float32))
    loss = _LayerLoss(layer)
    value, grads = ms.value_and_grad(loss, None, params)(x)
    weights = [p.asnumpy().copy() for p in params]   # asnumpy may share the parameter's memory
    nn.TrainOneStepCell(loss, nn.SGD(params, learning_rate=1.0))(x)    # one step: w -= grad
    stepped = [p.asnumpy() for p in params]
    return float(value.asnumpy()), [g.asnumpy() for g in grads], weights, stepped


def test_twin_native_sparse_attention_matches_the_cpu_backend(mode, twin, monkeypatch):
    twin_value, twin_grads, weights, twin_stepped = _nsa_layer_grads()
    calls = twin.calls()
    assert [name for name, _ in calls[:2]] == ["aclnnNsaSelectedAttention", "aclnnNsaSelectedAttentionGrad"]
    assert calls[0][1][5:7] == ["int_array 32,64", "int_array 32,64"]
    assert len(calls) == 4   # and once more each for the training step
    _use(monkeypatch, "cpu")
    cpu_value, cpu_grads, _, cpu_stepped = _nsa_layer_grads(weights)
    assert abs(twin_value - cpu_value) <= 1e-4 * abs(cpu_value)
    for index, (twin_grad, cpu_grad) in enumerate(zip(twin_grads, cpu_grads)):
        assert rel_error(twin_grad, cpu_grad) < REL_TOL["float16"], f"parameter {index}"
    assert np.abs(twin_grads[0]).max() > 0   # w_q: reached through the selected branch, among others
    for index, (twin_weight, cpu_weight, weight) in enumerate(zip(twin_stepped, cpu_stepped, weights)):
        assert rel_error(twin_weight - weight, cpu_weight - weight) < REL_TOL["float16"], f"step of parameter {index}"


# -- the construction itself ---------------------------------------------------------------------------
def test_bprop_signature_is_the_forward_arguments_then_out_dout():
    bprop = ascend.make_bprop(lambda *args: None)
    names = [arg.name for arg in load_op_def(FORWARD).args]
    assert list(inspect.signature(bprop).parameters) == names + ["out", "dout"]


def assert_reg_info_declares_every_argument_an_input_and_no_attr(op_name):
    op_def = load_op_def(op_name)
    for twin_target in (False, True):
        info = ascend.reg_info(op_def, twin=twin_target)
        assert [item["name"] for item in info["inputs"]] == [arg.name for arg in op_def.args]
        assert not info.get("attr")
        assert info["target"] == ("CPU" if twin_target else "Ascend")


@pytest.mark.parametrize("op_name", [FORWARD, BACKWARD])
def test_reg_info_declares_every_argument_an_input_and_no_attr(op_name):
    assert_reg_info_declares_every_argument_an_input_and_no_attr(op_name)


def test_backend_choice(monkeypatch):
    _use(monkeypatch, "")
    assert _backend.selected() == "cpu"
    _use(monkeypatch, "ascend_twin")
    assert _backend.selected() == "ascend_twin" and _backend.name() == "ascend"
    _use(monkeypatch, "npu")
    with pytest.raises(ValueError, match="MS_NSA_BACKEND='npu' is not a backend; use one of ascend, ascend_twin, cpu"):
        _backend.selected()
    _use(monkeypatch, "ascend")
    with pytest.raises(RuntimeError, match="needs MindSpore's device target 'Ascend', but it is 'CPU'"):
        _backend.selected()


def test_vendor_built_header_is_found(tmp_path, monkeypatch):
    """A vendor-built ops-transformer puts its headers where MindSpore does not look."""
    opp = tmp_path / "cann" / "opp"
    vendor = opp / "vendors" / "custom_transformer" / "op_api" / "include" / "aclnnop"
    vendor.mkdir(parents=True)
    header = "aclnn_nsa_selected_attention_grad.h"
    vendor.joinpath(header).write_text((ascend.TWIN_CANN / "include" / "aclnnop" / header).read_text())
    monkeypatch.setenv("ASCEND_OPP_PATH", str(opp))
    monkeypatch.delenv("ASCEND_CUSTOM_OPP_PATH", raising=False)
    monkeypatch.delenv(ascend.ACLNN_INCLUDE_ENV, raising=False)
    from mindspore.ops.operations._custom_ops_utils import CustomInfoGenerator
    assert CustomInfoGenerator("aclnnNsaSelectedAttentionGrad").get_aclnn_api_types() == []   # MindSpore misses it
    grad_def = load_op_def(BACKWARD)
    assert ascend.check_cann_prototype(grad_def) == ascend.prototype_types(grad_def)
    with pytest.raises(RuntimeError, match="MS_NSA_ACLNN_INCLUDE"):
        ascend.check_cann_prototype(load_op_def(FORWARD))
    monkeypatch.setenv(ascend.ACLNN_INCLUDE_ENV, str(ascend.TWIN_CANN / "include" / "aclnnop"))
    assert ascend.check_cann_prototype(load_op_def(FORWARD)) == ascend.prototype_types(load_op_def(FORWARD))


RANK_SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np, mindspore as ms
    ms.set_device("CPU")
    import ms_nsa
    from ms_nsa import _ascend_kernels as ascend
    q = ms.Tensor(np.ones((4, 1, 128), np.float16)); kv = ms.Tensor(np.ones((32, 1, 128), np.float16))
    out, _, _ = ms_nsa.nsa_select_attention(q, kv, kv, ms.Tensor(np.zeros((4, 1, 2), np.int32)) + ms.Tensor([0, 1], ms.int32),
                                            128 ** -0.5, 1, 16, 2, sparse_mode=2)
    assert float(out.astype(ms.float32).asnumpy().max()) == 1.0
    print(ascend.callback_directory())
""")


def test_ranks_compiling_callbacks_at_once_do_not_share_files(tmp_path):
    env = dict(os.environ, MS_NSA_BACKEND="ascend_twin", MS_COMPILER_CACHE_PATH=str(tmp_path),
               PYTHONPATH=str(ROOT))
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [rank.communicate(timeout=300) for rank in ranks]
    for rank, (_, err) in zip(ranks, results):
        assert rank.returncode == 0, err[-2000:]
    directories = [out.strip().splitlines()[-1] for out, _ in results]
    assert directories[0] != directories[1]
    assert all(d.startswith(str(tmp_path)) for d in directories)
    assert not any(Path(d).exists() for d in directories)   # removed at exit


@pytest.mark.parametrize("position, row, forward, backward", [
    (20, [3, 1, 0, 1], [0, 5, 16, 5], [16, 16, 16, 5]),    # own block 1 twice: the last slot holding it counts
    (20, [1, 0, 2, 3], [5, 16, 0, 0], [5, 0, 0, 0]),       # early row: slots after the own one masked
    (70, [4, 5, 0, 1], [7, 0, 16, 16], [7, 16, 16, 16]),   # late row (s + 1 >= β·C): later slots not masked
    (20, [0, 2, 3, 0], [16, 0, 0, 16], [0, 0, 0, 0]),      # no own block, s + 1 <= β·C: all masked
])
def test_cann_mask_rules(position, row, forward, backward):
    """The CANN flavour's rules on hand-worked rows (β = 16, C = 4): visible keys per slot."""
    row = np.array(row)
    assert list(reference.cann_forward_mask(row, 16, position)) == forward
    assert list(reference.causal(row, 16, position)) == forward      # the forward rule is the causal one
    assert list(reference.cann_backward_mask(row, 16, position)) == backward
