"""The Ascend backend: MindSpore `Custom` ops (func_type="aot") over CANN's aclnnNsaSelectedAttention and
aclnnNsaSelectedAttentionGrad. Nothing in this file has been run on an NPU (see docs/ascend.md).

How MindSpore 2.10 turns `ops.Custom(func="aclnnXxx", func_type="aot", reg_info=...)` into an aclnn call
(mindspore/ops/operations/custom_ops.py, _custom_ops_utils.py, and the Ascend kernel CustomV2AclnnKernelMod):

* It parses the prototype of aclnnXxxGetWorkspaceSize from $ASCEND_OPP_PATH/../include/aclnnop/aclnn_xxx.h
  and generates a small C++ callback that casts its `inputs` vector element i to the type of parameter i.
  The same type list becomes the primitive attribute `custom_inputs_type`, by which the kernel converts
  its i-th input (Tensor or None -> aclTensor*, tuple of ints -> aclIntArray*, str -> char*, ...).
* So what reaches aclnn is the primitive's call arguments, position by position. ms_nsa calls the
  primitive with every aclnn parameter, in the yaml's order, which is the prototype's order.
* reg_info only has to agree: its inputs + attrs + outputs must count as many as the prototype, and
  when the header is missing MindSpore derives the types from reg_info instead, inputs first, then
  attrs. reg_info therefore declares as inputs the leading tensors of the prototype and everything
  after the first non-tensor as attrs, in prototype order; a tensor among them (the gradient's
  attenMaskOptional, after the two aclIntArray) is an attr of type "tensor", which MindSpore maps to
  aclTensor*. Then reg_info order = prototype order = call order, whichever way MindSpore reads it.
* PyNative calls a Custom aclnn op through pyboost, whose kernel exists only for up to 12 inputs +
  outputs (the forward has 16, the gradient 20). Graph mode uses CustomV2AclnnKernelMod, which has no
  such limit. The ops are therefore always called from a compiled Cell (`ms.jit` construct), also in
  PyNative.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.ops import CustomRegOp
from mindspore.ops.composite.multitype_ops.zeros_like_impl import zeros_like

from ._cpu_kernels import kernel_inputs
from ._dtypes import dtype_name, ms_dtype
from .op_def import BACKWARD, FORWARD, OpDef, load_op_def

BACKEND = "ascend"
INPUT_LAYOUT = "TND"

# How each yaml kind appears in the aclnn prototype, and as the value type of a CustomRegOp attr
# (CustomCodeGenerator._get_type_declaration maps these back to the prototype types).
ACLNN_TYPES = {"tensor": "aclTensor*", "int_array": "aclIntArray*", "float": "double", "int": "int64_t",
               "str": "char*"}
REG_INFO_ATTR_TYPES = {"tensor": "tensor", "int_array": "listInt", "float": "double", "int": "int", "str": "str"}

# The causal mask given to both passes when sparse_mode = 2. CANN's kernels never read its contents:
# the forward only checks that it is 2-D and bool/uint8 and then applies the causal mask (without it,
# the forward would ignore sparse_mode = 2 while the backward would not). 2048 x 2048 with True above
# the diagonal (True = masked) is CANN's usual compressed causal mask for sparse_mode 2, so the mask
# also says the right thing should a kernel ever read it.
CAUSAL_MASK_SIZE = 2048


@functools.lru_cache(maxsize=None)
def causal_mask() -> Tensor:
    """The one mask (built once, shared by every forward and gradient op)."""
    return Tensor(np.triu(np.ones((CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE), dtype=np.bool_), k=1))


# -- the interface as aclnn and reg_info see it (all from the yaml) ---------------------------------
def prototype_types(op_def: OpDef) -> List[str]:
    """The parameter types of aclnn<Op>GetWorkspaceSize, in order, as MindSpore spells them."""
    return ([ACLNN_TYPES[arg.kind] for arg in op_def.args] + ["aclTensor*"] * len(op_def.outputs)
            + ["uint64_t*", "aclOpExecutor**"])


def _tensor_dtype(op_def: OpDef, name: str, primary: str) -> str:
    """The dtype of a tensor (argument or output) in the reg_info row whose first tensor is `primary`."""
    rule = (op_def.arg(name).resolved(BACKEND)["dtype"] if name not in op_def.output_names
            else dict(op_def.outputs)[name]["dtype"])
    if isinstance(rule, dict):
        return _tensor_dtype(op_def, rule["same_as"], primary)
    if isinstance(rule, str):
        return rule
    return primary if primary in rule else rule[0]


def reg_info(op_def: OpDef) -> Dict[str, Any]:
    """A fresh reg_info (MindSpore rewrites parts of it when it registers the op)."""
    reg = CustomRegOp(op_def.aclnn)
    input_names = []
    for arg in op_def.args:
        param_type = "optional" if arg.optional else "required"
        if arg.kind == "tensor" and len(input_names) == op_def.args.index(arg):
            reg.input(len(input_names), arg.name, param_type)
            input_names.append(arg.name)
        else:
            reg.attr(arg.name, param_type, REG_INFO_ATTR_TYPES[arg.kind])
    for index, name in enumerate(op_def.output_names):
        reg.output(index, name, "required")
    first_tensor = op_def.tensor_args[0]
    for primary in first_tensor.resolved(BACKEND)["dtype"]:
        reg.dtype_format(*[(_tensor_dtype(op_def, name, primary), "DefaultFormat")
                           for name in input_names + op_def.output_names])
    return reg.target("Ascend").get_op_info()


def check_cann_prototype(op_def: OpDef) -> None:
    """Compares the installed CANN's prototype (read by MindSpore's own parser) with the yaml."""
    from mindspore.ops.operations._custom_ops_utils import CustomInfoGenerator
    found = CustomInfoGenerator(op_def.aclnn).get_aclnn_api_types()
    if not found:
        raise RuntimeError(f"{op_def.python['function']}: MindSpore found no prototype of "
                           f"{op_def.aclnn}GetWorkspaceSize (header aclnnop/aclnn_*.h under "
                           f"$ASCEND_OPP_PATH/../include); install a CANN with the NSA ops and source its "
                           f"set_env.sh (docs/ascend.md)")
    expected = prototype_types(op_def)
    if found != expected:
        raise RuntimeError(f"{op_def.python['function']}: the installed CANN declares {op_def.aclnn}"
                           f"GetWorkspaceSize({', '.join(found)}), but ms_nsa passes "
                           f"({', '.join(expected)}); this CANN version is not supported")


# -- the ops ----------------------------------------------------------------------------------------
def _check_attrs(op_def: OpDef, scale_value, head_num, sparse_mode, select_block_size,
                 select_block_count) -> Dict[str, Any]:
    """The attributes, checked against the yaml's Ascend rules and normalised to Python scalars."""
    return op_def.check_attrs(dict(scale_value=scale_value, head_num=head_num, sparse_mode=sparse_mode,
                                   select_block_size=select_block_size,
                                   select_block_count=select_block_count), BACKEND)


def _fixed_arguments(op_def: OpDef, attrs: Mapping[str, Any]) -> Dict[str, Any]:
    """The aclnn arguments that are not call inputs: the mask and the scalars."""
    fixed = {name: float(value) if op_def.arg(name).kind == "float" else value for name, value in attrs.items()}
    fixed["input_layout"] = INPUT_LAYOUT
    fixed["atten_mask"] = causal_mask() if attrs["sparse_mode"] == 2 else None
    return fixed


def call_plan(op_def: OpDef, fixed: Mapping[str, Any]) -> Tuple[Tuple[bool, Any], ...]:
    """For each aclnn argument in order: (True, index of the call input) or (False, the fixed value)."""
    inputs = kernel_inputs(op_def)
    return tuple((True, inputs.index(arg.name)) if arg.name in inputs else (False, fixed[arg.name])
                 for arg in op_def.args)


def aclnn_arguments(plan, inputs):
    """The primitive's arguments, in aclnn order, from the call inputs and the plan."""
    arguments = ()
    for is_input, item in plan:
        if is_input:
            arguments = arguments + (inputs[item],)
        else:
            arguments = arguments + (item,)
    return arguments


def _infer(op_def: OpDef, attrs: Mapping[str, Any]):
    """out_shape / out_dtype callables over all aclnn arguments (None = absent, int arrays as tuples)."""

    def infer_shape(*shapes):
        named = {}
        for arg, shape in zip(op_def.args, shapes):
            if shape is None or arg.kind not in ("tensor", "int_array"):
                continue
            named[arg.name] = (len(shape),) if arg.kind == "int_array" else shape
        dims = op_def.bind_dims(named, attrs, BACKEND)
        return tuple(op_def.infer_shapes(dims, attrs))

    def infer_dtype(*dtypes):
        named = {arg.name: dtype_name(dtype) for arg, dtype in zip(op_def.args, dtypes)
                 if arg.kind == "tensor" and dtype is not None}
        op_def.check_dtypes(named, BACKEND)
        return tuple(ms_dtype(dtype) for dtype in op_def.infer_dtypes(named))

    return infer_shape, infer_dtype


def _custom(op_def: OpDef, attrs: Mapping[str, Any], bprop=None) -> ops.Custom:
    infer_shape, infer_dtype = _infer(op_def, attrs)
    return ops.Custom(op_def.aclnn, out_shape=infer_shape, out_dtype=infer_dtype, func_type="aot",
                      bprop=bprop, reg_info=reg_info(op_def))


@functools.lru_cache(maxsize=1024)  # a C-level callable: graph mode calls it at compile time
def _check_batches(function, block_size, block_count, cu_seq_q, cu_seq_kv):
    """CANN's per-batch rules on the lengths (CANN does not check them itself)."""
    if len(cu_seq_q) != len(cu_seq_kv):
        raise ValueError(f"{function}: actual_seq_qlen has {len(cu_seq_q)} batches but actual_seq_kvlen has "
                         f"{len(cu_seq_kv)}; they must have the same length")
    q_begin, kv_begin = 0, 0
    for batch, (q_end, kv_end) in enumerate(zip(cu_seq_q, cu_seq_kv)):
        kv_length = kv_end - kv_begin
        if q_end > q_begin and (kv_length % block_size or kv_length < block_size * block_count):
            raise ValueError(f"{function}: batch {batch} has {kv_length} keys; on Ascend every batch with "
                             f"queries needs a KV length that is a multiple of select_block_size = "
                             f"{block_size} and at least select_block_size * select_block_count = "
                             f"{block_size * block_count}")
        q_begin, kv_begin = q_end, kv_end


class AclnnCall(nn.Cell):
    """Calls one aclnn Custom primitive with the backend-independent call inputs (see _backend).

    construct is compiled (ms.jit) in PyNative too: MindSpore 2.10's PyNative path for Custom aclnn ops
    handles at most 12 arguments + outputs, its graph path any number.
    """

    def __init__(self, primitive: ops.Custom, op_def: OpDef, attrs: Mapping[str, Any]):
        super().__init__()
        self.primitive = primitive
        self.plan = call_plan(op_def, _fixed_arguments(op_def, attrs))
        inputs = kernel_inputs(op_def)
        self.lengths = (inputs.index("actual_seq_qlen"), inputs.index("actual_seq_kvlen"))
        self.batch_rule = (op_def.python["function"], attrs["select_block_size"], attrs["select_block_count"])

    @ms.jit
    def construct(self, *inputs):
        function, block_size, block_count = self.batch_rule
        _check_batches(function, block_size, block_count, inputs[self.lengths[0]], inputs[self.lengths[1]])
        return self.primitive(*aclnn_arguments(self.plan, inputs))


# lru_cache objects, as on the CPU: graph mode runs them at compile time instead of parsing them.
@functools.lru_cache(maxsize=None, typed=True)
def grad_op(scale_value, head_num, sparse_mode, select_block_size, select_block_count) -> AclnnCall:
    op_def = load_op_def(BACKWARD)
    attrs = _check_attrs(op_def, scale_value, head_num, sparse_mode, select_block_size, select_block_count)
    check_cann_prototype(op_def)
    return AclnnCall(_custom(op_def, attrs), op_def, attrs)


# The forward arguments that get gradients, in the order of the gradient's outputs (dq, dk, dv).
DIFFERENTIABLE = ("query", "key", "value")


def make_bprop(forward_def: OpDef, grad_def: OpDef, grad_primitive):
    """The forward primitive's bprop: the gradient primitive, fed by name from the forward's arguments.

    Gradients flow into query, key and value; softmax_max/softmax_sum are not differentiated and every
    other argument (indices, mask, lengths, scalars) gets a zero of its own kind.
    """
    forward_names = [arg.name for arg in forward_def.args]
    output_names = forward_def.output_names
    # The gradient's arguments come from the forward's arguments, its outputs and the incoming gradient
    # of attention_out (the gradient op's `grad`).
    available = forward_names + output_names + ["grad"]
    grad_plan = tuple((True, available.index(arg.name)) for arg in grad_def.args)
    attention_out = output_names.index("attention_out")
    gradient_of = tuple(DIFFERENTIABLE.index(name) if name in DIFFERENTIABLE else -1 for name in forward_names)

    def bprop(*args):
        forward_arguments, out, dout = args[:-2], args[-2], args[-1]
        values = forward_arguments + out + (dout[attention_out],)
        gradients = grad_primitive(*aclnn_arguments(grad_plan, values))
        result = ()
        for position in range(len(gradient_of)):
            if gradient_of[position] >= 0:
                result = result + (gradients[gradient_of[position]],)
            else:
                result = result + (zeros_like(forward_arguments[position]),)
        return result

    return bprop


@functools.lru_cache(maxsize=None, typed=True)
def forward_op(scale_value, head_num, sparse_mode, select_block_size, select_block_count) -> AclnnCall:
    forward_def, grad_def = load_op_def(FORWARD), load_op_def(BACKWARD)
    attrs = _check_attrs(forward_def, scale_value, head_num, sparse_mode, select_block_size, select_block_count)
    backward = grad_op(*(attrs[name] for name in ("scale_value", "head_num", "sparse_mode",
                                                  "select_block_size", "select_block_count")))
    check_cann_prototype(forward_def)
    bprop = make_bprop(forward_def, grad_def, backward.primitive)
    return AclnnCall(_custom(forward_def, attrs, bprop=bprop), forward_def, attrs)


def int_array(values) -> Tuple[int, ...]:
    """aclnn takes the cumulative lengths as an aclIntArray, which MindSpore builds from a tuple."""
    return tuple(values)


def check_length_tensor(name, function):
    raise TypeError(f"{function}: on Ascend {name} must be a tuple or list of ints: CANN takes the lengths "
                    f"as host-side integers (aclIntArray), which a device Tensor cannot provide inside a "
                    f"graph")
