"""The Ascend backend's contract with CANN, checked without an NPU.

A fake CANN tree (headers with the exact prototypes of the spec, §5) lets MindSpore 2.10 build the
Ascend Custom ops as it would on an Atlas A2: parse the prototype, generate and compile the
`...GetWorkSpaceSize` callback. The callback is then run with a recording stand-in for the aclnn
function, fed the arguments ms_nsa passes, converted the way MindSpore's Ascend kernel converts them.

These tests call MindSpore's code generator and the bprop as plain Python, never the compiler: they
missed both the rejected `*args` bprop and the arguments MindSpore's passes dropped (issue 10). The
evidence that the Ascend construction works through MindSpore's compiler and autodiff is the Ascend
twin, tests/test_ascend_twin.py; these remain as quick checks of the header-level contract.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor
from mindspore.ops.operations import custom_ops
from mindspore.ops.operations._custom_ops_utils import CustomCodeGenerator, CustomInfoGenerator

from fake_cann import FORWARD_PROTOTYPE, GRAD_PROTOTYPE, PROTOTYPES, FakeCann, environment, parameter_names
from ms_nsa import _ascend_kernels as ascend
from ms_nsa import _backend
from ms_nsa.op_def import BACKWARD, FORWARD, load_op_def

# The prototype's parameter for each yaml argument, and the value the stand-in must log for it. Written
# out by hand from the spec, so a moved, dropped or retyped yaml argument shows up here.
T1, T2, N1, N2, D, BLOCK, COUNT = 7, 160, 4, 2, 128, 32, 3
SCALE = 0.088388347648318
CU_Q, CU_KV = (3, 7), (64, 160)


def _expected_forward(sparse_mode):
    mask = "tensor causal_mask" if sparse_mode == 2 else "null"
    return dict(query="tensor query", key="tensor key", value="tensor value", topkIndices="tensor topk_indices",
                attenMaskOptional=mask, actualSeqQLenOptional="int_array 3,7",
                actualSeqKvLenOptional="int_array 64,160", scaleValue=f"double {SCALE:.17g}", headNum=f"int {N1}",
                inputLayout="str TND", sparseMode=f"int {sparse_mode}", selectedBlockSize=f"int {BLOCK}",
                selectedBlockCount=f"int {COUNT}", softmaxMaxOut="tensor out0", softmaxSumOut="tensor out1",
                attentionOut="tensor out2", workspaceSize="workspace_size", executor="executor")


def _expected_grad(sparse_mode):
    forward = _expected_forward(sparse_mode)
    return dict(query="tensor query", key="tensor key", value="tensor value", attentionOut="tensor attention_out",
                attentionOutGrad="tensor grad", softmaxMax="tensor softmax_max", softmaxSum="tensor softmax_sum",
                topkIndices="tensor topk_indices", actualSeqQLenOptional=forward["actualSeqQLenOptional"],
                actualSeqKvLenOptional=forward["actualSeqKvLenOptional"],
                attenMaskOptional=forward["attenMaskOptional"], scaleValue=forward["scaleValue"],
                selectedBlockSize=forward["selectedBlockSize"], selectedBlockCount=forward["selectedBlockCount"],
                headNum=forward["headNum"], inputLayout="str TND", sparseMode=forward["sparseMode"],
                dqOut="tensor out0", dkOut="tensor out1", dvOut="tensor out2", workspaceSize="workspace_size",
                executor="executor")


def _log_in_prototype_order(prototype, expected):
    return [expected[name] for name in parameter_names(prototype)]


class _AscendContext:
    """What custom_ops sees as MindSpore's context: device target Ascend, everything else unchanged."""

    def __init__(self, real):
        self._real = real

    def get_context(self, key):
        return "Ascend" if key == "device_target" else self._real.get_context(key)

    def __getattr__(self, name):
        return getattr(self._real, name)


def _forget_ops():
    """Ops built here must not leak into (or come from) the caches of other tests."""
    ascend.forward_op.cache_clear()
    ascend.grad_op.cache_clear()


@pytest.fixture(scope="module")
def cann():
    root = Path(tempfile.mkdtemp(prefix="ms_nsa_cann_"))
    return FakeCann(root)


@pytest.fixture
def on_ascend(cann, monkeypatch, tmp_path):
    """Builds ops as on an Atlas A2 (MindSpore generates and compiles the callbacks into tmp_path)."""
    for name, value in environment(cann, tmp_path / "kernel_meta").items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.setattr(custom_ops, "context", _AscendContext(custom_ops.context))
    _forget_ops()
    yield cann
    _forget_ops()


def _tensors(dtype=ms.float16):
    shapes = dict(query=(T1, N1, D), key=(T2, N2, D), value=(T2, N2, D), attention_out=(T1, N1, D),
                  grad=(T1, N1, D))
    tensors = {name: Tensor(np.zeros(shape, np.float32)).astype(dtype) for name, shape in shapes.items()}
    tensors["topk_indices"] = Tensor(np.zeros((T1, N2, COUNT), np.int32))
    tensors["softmax_max"] = Tensor(np.zeros((T1, N1, 8), np.float32))
    tensors["softmax_sum"] = Tensor(np.zeros((T1, N1, 8), np.float32))
    tags = {id(t): name for name, t in tensors.items()}
    tags[id(ascend.causal_mask())] = "causal_mask"
    return tensors, tags


def _call_inputs(op_def, tensors):
    values = dict(tensors, actual_seq_qlen=ascend.int_array(CU_Q), actual_seq_kvlen=ascend.int_array(CU_KV))
    return tuple(values[name] for name in _backend.call_inputs(op_def))


def _attrs(sparse_mode):
    return (SCALE, N1, sparse_mode, BLOCK, COUNT)


# -- reg_info and the op as built on Ascend ---------------------------------------------------------
@pytest.mark.parametrize("op_name, prototype", [(FORWARD, FORWARD_PROTOTYPE), (BACKWARD, GRAD_PROTOTYPE)])
def test_reg_info_types_are_the_prototype(op_name, prototype, on_ascend):
    op_def = load_op_def(op_name)
    parsed = CustomInfoGenerator(op_def.aclnn).get_aclnn_api_types()   # MindSpore's reading of the header
    assert len(parsed) == len(parameter_names(prototype))
    # What MindSpore derives from reg_info alone (when it finds no header) has the right count but types
    # every reg_info input aclTensor*: so ms_nsa refuses to build an op without a header it can read.
    from_reg_info = CustomCodeGenerator().get_api_types_by_reg_info(ascend.reg_info(op_def))
    assert len(from_reg_info) == len(parsed)
    assert from_reg_info[:-2] != parsed[:-2]
    assert ascend.prototype_types(op_def) == parsed


@pytest.mark.parametrize("sparse_mode", [0, 2])
def test_ops_built_as_on_ascend_carry_the_yaml(sparse_mode, on_ascend):
    forward_def, grad_def = load_op_def(FORWARD), load_op_def(BACKWARD)
    forward, grad = ascend.forward_op(*_attrs(sparse_mode)), ascend.grad_op(*_attrs(sparse_mode))
    other = ascend.forward_op(SCALE, N1, 2 - sparse_mode, 64, 2)   # a second op from the same reg_info
    for op, op_def in ((forward, forward_def), (grad, grad_def), (other, forward_def)):
        attrs = op.primitive.attrs
        assert op.primitive.is_ascend_c
        assert attrs["reg_op_name"] == op_def.aclnn
        assert list(attrs["custom_inputs_type"]) == ascend.prototype_types(op_def)[:-2]
        assert list(attrs["input_names"]) == [arg.name for arg in op_def.args]
        assert list(attrs["output_names"]) == op_def.output_names
        assert attrs["multi_output"]
        library = attrs["custom_callback_func"].rsplit(":", 1)[0]
        assert Path(library).is_file()
    assert forward.primitive.bprop is not None and grad.primitive.bprop is None
    mask = dict(zip([a.name for a in forward_def.args], forward.plan))["atten_mask"]
    if sparse_mode == 2:
        assert mask == (False, ascend.causal_mask())
        assert ascend.causal_mask().shape == (ascend.CAUSAL_MASK_SIZE,) * 2
        assert ascend.causal_mask().dtype == ms.bool_
        assert ascend.causal_mask() is ascend.causal_mask()     # built once
    else:
        assert mask == (False, None)


# -- what aclnn receives ----------------------------------------------------------------------------
def _aclnn_log(cann, op, op_def, arguments, tags):
    """What the aclnn stand-in receives when MindSpore's generated callback is given `arguments`."""
    attrs = op.primitive.attrs
    return cann.call(attrs["custom_callback_func"], op_def.aclnn, list(attrs["custom_inputs_type"]), arguments, tags,
                     ["out0", "out1", "out2"])


@pytest.mark.parametrize("sparse_mode", [0, 2])
@pytest.mark.parametrize("op_name, factory, prototype, expected", [
    (FORWARD, "forward_op", FORWARD_PROTOTYPE, _expected_forward),
    (BACKWARD, "grad_op", GRAD_PROTOTYPE, _expected_grad)])
def test_call_reaches_aclnn_with_every_argument(op_name, factory, prototype, expected, sparse_mode, on_ascend):
    op_def = load_op_def(op_name)
    op = getattr(ascend, factory)(*_attrs(sparse_mode))
    tensors, tags = _tensors()
    arguments = ascend.aclnn_arguments(op.plan, _call_inputs(op_def, tensors))
    assert _aclnn_log(on_ascend, op, op_def, arguments, tags) == _log_in_prototype_order(prototype, expected(sparse_mode))


@pytest.mark.parametrize("sparse_mode", [0, 2])
def test_bprop_feeds_the_grad_op_and_returns_dq_dk_dv(sparse_mode, on_ascend):
    forward_def, grad_def = load_op_def(FORWARD), load_op_def(BACKWARD)
    forward, grad = ascend.forward_op(*_attrs(sparse_mode)), ascend.grad_op(*_attrs(sparse_mode))
    tensors, tags = _tensors()
    forward_arguments = ascend.aclnn_arguments(forward.plan, _call_inputs(forward_def, tensors))
    received = []
    dq, dk, dv = object(), object(), object()

    def grad_primitive(*arguments):
        received.append(arguments)
        return dq, dk, dv

    bprop = ascend.make_bprop(grad_primitive)
    unused = Tensor(np.ones((T1, N1, 8), np.float32))
    out = (tensors["softmax_max"], tensors["softmax_sum"], tensors["attention_out"])
    gradients = bprop(*forward_arguments, out, (unused, unused, tensors["grad"]))
    names = [arg.name for arg in forward_def.args]
    assert gradients[names.index("query")] is dq
    assert gradients[names.index("key")] is dk
    assert gradients[names.index("value")] is dv
    assert len(gradients) == len(names)
    assert _aclnn_log(on_ascend, grad, grad_def, received[0], tags) == _log_in_prototype_order(GRAD_PROTOTYPE, _expected_grad(sparse_mode))


# -- validation before anything reaches aclnn -------------------------------------------------------
@pytest.mark.parametrize("attrs, message", [
    ((SCALE, N1, 1, BLOCK, COUNT), "sparse_mode"),
    ((SCALE, N1, 0, 24, COUNT), "select_block_size"),
    ((SCALE, N1, 0, 144, COUNT), "select_block_size"),
    ((SCALE, N1, 0, BLOCK, 33), "select_block_count"),
    ((float("nan"), N1, 0, BLOCK, COUNT), "scale_value"),
])
def test_bad_attributes_are_refused_before_any_op_is_built(attrs, message, on_ascend):
    with pytest.raises((ValueError, TypeError), match=message):
        ascend.forward_op(*attrs)


def test_infer_checks_the_cann_contract(on_ascend):
    op_def = load_op_def(FORWARD)
    op = ascend.forward_op(*_attrs(2))
    tensors, _ = _tensors()
    arguments = ascend.aclnn_arguments(op.plan, _call_inputs(op_def, tensors))

    def shape_of(value):   # what MindSpore hands an out_shape callable
        if value is None:
            return None
        if isinstance(value, tuple):
            return tuple([] for _ in value)
        return list(value.shape) if isinstance(value, Tensor) else []

    shapes = [shape_of(v) for v in arguments]
    assert op.primitive.out_shape(*shapes) == ([T1, N1, 8], [T1, N1, 8], [T1, N1, D])
    dtypes = [None if v is None else (ms.TensorType(v.dtype) if isinstance(v, Tensor) else ms.int64)
              for v in arguments]
    assert op.primitive.out_dtype(*dtypes) == (ms.float32, ms.float32, ms.float16)
    bad_d = list(shapes)
    bad_d[0], bad_d[1], bad_d[2] = [T1, N1, 64], [T2, N2, 64], [T2, N2, 64]
    with pytest.raises(ValueError, match="D = 64"):
        op.primitive.out_shape(*bad_d)
    with pytest.raises(ValueError, match="head_num"):
        bad_heads = list(shapes)
        bad_heads[0] = [T1, 2 * N1, D]
        op.primitive.out_shape(*bad_heads)
    float32 = [ms.TensorType(ms.float32) if isinstance(d, ms.TensorType) and i < 3 else d
               for i, d in enumerate(dtypes)]
    with pytest.raises(TypeError, match="float32"):
        op.primitive.out_dtype(*float32)


def test_lengths_are_checked_against_cann_rules(on_ascend):
    check = ascend._check_batches   # noqa: SLF001  (the rule AclnnCall.construct applies)
    check("nsa_select_attention", 32, 3, (3, 7), (96, 192))
    with pytest.raises(ValueError, match="batch 1 has 80 keys"):
        check("nsa_select_attention", 32, 3, (3, 7), (96, 176))
    with pytest.raises(ValueError, match="batch 0 has 64 keys"):
        check("nsa_select_attention", 32, 3, (3, 7), (64, 160))
    check("nsa_select_attention", 32, 3, (0, 7), (64, 160))     # a batch without queries is fine
    with pytest.raises(TypeError, match="tuple or list"):
        ascend.check_length_tensor("actual_seq_qlen", "nsa_select_attention")


def test_a_cann_with_another_prototype_is_refused(tmp_path, monkeypatch):
    moved = dict(PROTOTYPES)
    moved["aclnnNsaSelectedAttentionGrad"] = GRAD_PROTOTYPE.replace(
        "const aclIntArray *actualSeqQLenOptional,\n    const aclIntArray *actualSeqKvLenOptional, "
        "const aclTensor *attenMaskOptional,",
        "const aclTensor *attenMaskOptional, const aclIntArray *actualSeqQLenOptional,\n    "
        "const aclIntArray *actualSeqKvLenOptional,")
    assert moved["aclnnNsaSelectedAttentionGrad"] != GRAD_PROTOTYPE
    other = FakeCann(Path(tempfile.mkdtemp(prefix="ms_nsa_cann_")), moved, stand_ins=False)
    monkeypatch.setenv("ASCEND_OPP_PATH", str(other.opp))
    monkeypatch.delenv("ASCEND_CUSTOM_OPP_PATH", raising=False)
    ascend.check_cann_prototype(load_op_def(FORWARD))
    with pytest.raises(RuntimeError, match="not supported"):
        ascend.check_cann_prototype(load_op_def(BACKWARD))
    monkeypatch.setenv("ASCEND_OPP_PATH", str(tmp_path / "no_cann" / "opp"))
    with pytest.raises(RuntimeError, match="found no prototype"):
        ascend.check_cann_prototype(load_op_def(BACKWARD))


def test_cpu_device_dispatches_to_the_cpu_kernels():
    assert _backend.current().BACKEND == "cpu" == _backend.name()
