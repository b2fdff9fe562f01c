"""The Ascend backend: MindSpore `Custom` ops (func_type="aot") over CANN's aclnn ops. This file holds the
construction every such op shares (reg_info, the call plan, AclnnCall, the twin, CANN's softmax layout,
MindSpore's flash-attention gradient) and the selected pair's ops (aclnnNsaSelectedAttention[Grad]); the
other ops' Ascend sides live in their folders (ms_nsa/compress/ascend.py,
ms_nsa/compress_attention/ascend.py). Nothing here has been run on an NPU; on a CPU, the Ascend twin
(MS_NSA_BACKEND=ascend_twin, docs/ascend.md) compiles and differentiates these very ops with MindSpore and
runs them against a stand-in for the aclnn library.

How MindSpore 2.10 turns `ops.Custom(func="aclnnXxx", func_type="aot", reg_info=...)` into an aclnn call
(mindspore/ops/operations/custom_ops.py, _custom_ops_utils.py, and the Ascend kernel CustomV2AclnnKernelMod):

* It parses the prototype of aclnnXxxGetWorkspaceSize from the CANN header and generates a small C++
  callback that casts element i of its `inputs` vector to the type of parameter i; the type list becomes
  the primitive attribute `custom_inputs_type`, by which the kernel converts its i-th input (Tensor or
  None -> aclTensor*, tuple of ints -> aclIntArray*, float -> double, int -> int64_t, str -> char*).
* The kernel builds that vector from the graph node's inputs, so every aclnn argument must still be a
  node input after the backend passes. reg_info therefore declares **every** aclnn parameter as an
  input, in prototype order, and no attrs: `Custom._save_attr` puts every value-less reg_info attr into
  `attr_names`, and the pass CustomOpConstInputToAttr deletes each constant call input of such a name
  (measured: 13 -> 5 forward inputs, 17 -> 8 for the gradient). ms_nsa calls the primitive with every
  aclnn argument in the yaml's order, which is the prototype's order.
* PyNative calls a Custom aclnn op through pyboost, whose kernel exists only for up to 12 inputs +
  outputs (the selected forward has 16, its gradient 20). Graph mode uses CustomV2AclnnKernelMod, which
  has no such limit. The ops are therefore always called from a compiled Cell (`ms.jit` construct), also
  in PyNative.
* The bprop has an explicit signature (the forward's arguments, then out, dout): MindSpore's bprop
  parser rejects `*args`.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import glob
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.ops import CustomRegOp, DataType
from mindspore.ops.composite.multitype_ops.zeros_like_impl import zeros_like
from mindspore.ops.operations import custom_ops
from mindspore.ops.operations._custom_ops_utils import CustomCodeGenerator, CustomInfoGenerator

from ._cpu_kernels import kernel_inputs
from ._dtypes import dtype_name, ms_dtype
from .op_def import BACKWARD, FORWARD, OpDef, load_op_def

BACKEND = "ascend"
INPUT_LAYOUT = "TND"

# How each yaml kind appears in the aclnn prototype.
ACLNN_TYPES = {"tensor": "aclTensor*", "int_array": "aclIntArray*", "float": "double", "int": "int64_t",
               "str": "char*"}
# The dtype_format entry of each non-tensor kind (what MindSpore's graph carries for such an input).
# A str has no tensor dtype; on the CPU the twin passes it as a tuple of character codes (see TWIN).
REG_INFO_SCALAR_DTYPES = {"int_array": DataType.I64_Default, "float": DataType.F32_Default,
                          "int": DataType.I64_Default, "str": DataType.None_None}
TWIN_REG_INFO_SCALAR_DTYPES = dict(REG_INFO_SCALAR_DTYPES, str=DataType.I64_Default)

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


def _tensor_dtypes(op_def: OpDef, name: str, primary: str) -> List[Tuple[str, str]]:
    """The dtype_format entries a tensor (argument or output) may take in the row whose first tensor is
    `primary`; an optional tensor may also be absent."""
    if name in op_def.output_names:
        rule = dict(op_def.outputs)[name]["dtype"]
    else:
        rule = op_def.arg(name).resolved(BACKEND)["dtype"]
    if isinstance(rule, dict):
        return _tensor_dtypes(op_def, rule["same_as"], primary)
    choices = [rule] if isinstance(rule, str) else ([primary] if primary in rule else list(rule))
    entries = [(dtype, "DefaultFormat") for dtype in choices]
    if name not in op_def.output_names and op_def.arg(name).optional:
        entries.append(DataType.None_None)
    return entries


def reg_info(op_def: OpDef, twin: bool = False) -> Dict[str, Any]:
    """A fresh reg_info: every aclnn parameter an input, in prototype order; no attrs (see the module doc).

    The dtype_format rows name what each input carries; the CPU target's kernel selection checks them
    (the twin), the Ascend one is not known to. The twin differs only in its target and in the str row.
    """
    reg = CustomRegOp(op_def.aclnn)
    scalar_rows = TWIN_REG_INFO_SCALAR_DTYPES if twin else REG_INFO_SCALAR_DTYPES
    for index, arg in enumerate(op_def.args):
        reg.input(index, arg.name, "optional" if arg.optional else "required")
    for index, name in enumerate(op_def.output_names):
        reg.output(index, name, "required")
    for primary in op_def.tensor_args[0].resolved(BACKEND)["dtype"]:
        per_position = [_tensor_dtypes(op_def, arg.name, primary) if arg.kind == "tensor"
                        else [scalar_rows[arg.kind]] for arg in op_def.args]
        per_position += [_tensor_dtypes(op_def, name, primary) for name in op_def.output_names]
        for row in _combinations(per_position):
            reg.dtype_format(*row)
    return reg.target("CPU" if twin else "Ascend").get_op_info()


def _combinations(choices):
    rows = [()]
    for options in choices:
        rows = [row + (option,) for row in rows for option in options]
    return rows


# -- finding the prototype --------------------------------------------------------------------------
# MindSpore looks for aclnn_<op>.h under $ASCEND_CUSTOM_OPP_PATH/op_api/include/,
# $ASCEND_OPP_PATH/vendors/<name>/op_api/include/ and $ASCEND_OPP_PATH/../include/aclnnop/. A vendor-built
# ops-transformer installs into vendors/<name>/op_api/include/aclnnop/, which it misses; so ms_nsa also
# looks there, and in the directory MS_NSA_ACLNN_INCLUDE names (the one holding the header).
ACLNN_INCLUDE_ENV = "MS_NSA_ACLNN_INCLUDE"


def _header_directories() -> List[str]:
    directories = []
    if os.environ.get(ACLNN_INCLUDE_ENV):
        directories.append(os.environ[ACLNN_INCLUDE_ENV])
    opp = os.environ.get("ASCEND_OPP_PATH")
    if opp:
        directories += sorted(glob.glob(os.path.join(opp, "vendors", "*", "op_api", "include", "aclnnop")))
    return directories


def find_prototype(aclnn_name: str) -> Tuple[List[str], Optional[str]]:
    """(the parameter types, the directory) of aclnn_name's GetWorkspaceSize; ([], None) if not found.

    MindSpore's own lookup and parser first; then MindSpore's parser on the directories it misses.
    """
    if os.environ.get("ASCEND_OPP_PATH") or os.environ.get("ASCEND_CUSTOM_OPP_PATH"):
        found = CustomInfoGenerator(aclnn_name).get_aclnn_api_types()
        if found:
            return found, None
    for directory in _header_directories():
        generator = CustomInfoGenerator(aclnn_name)
        if generator._get_aclnn_api_from_file(directory):  # pylint: disable=protected-access
            generator._get_aclnn_api_params = lambda: None  # pylint: disable=protected-access
            return generator.get_aclnn_api_types(), directory
    return [], None


def check_cann_prototype(op_def: OpDef) -> Optional[List[str]]:
    """Compares the installed CANN's prototype (read by MindSpore's own parser) with the yaml.

    Returns the types when they were found somewhere MindSpore does not look (then the callback must be
    regenerated from them), else None.
    """
    found, directory = find_prototype(op_def.aclnn)
    if not found:
        raise RuntimeError(f"{op_def.python['function']}: found no prototype of {op_def.aclnn}GetWorkspaceSize "
                           f"(header aclnnop/{CustomInfoGenerator._get_aclnn_api_file_name(op_def.aclnn)}) under "
                           f"$ASCEND_OPP_PATH/../include, $ASCEND_OPP_PATH/vendors/*/op_api/include or "
                           f"${ACLNN_INCLUDE_ENV}; install a CANN with the NSA ops and source its set_env.sh, or "
                           f"set {ACLNN_INCLUDE_ENV} to the directory holding the header (docs/ascend.md)")
    expected = prototype_types(op_def)
    if found != expected:
        raise RuntimeError(f"{op_def.python['function']}: the installed CANN declares {op_def.aclnn}"
                           f"GetWorkspaceSize({', '.join(found)}), but ms_nsa passes "
                           f"({', '.join(expected)}); this CANN version is not supported")
    return found if directory else None


# -- where the generated callbacks are compiled -----------------------------------------------------
@functools.lru_cache(maxsize=None)
def callback_directory() -> str:
    """A directory of this process's own for MindSpore's generated callbacks.

    MindSpore writes and compiles each callback at a fixed path under MS_COMPILER_CACHE_PATH (default
    ./custom_kernel_meta/) without a lock, and loads it later, at kernel launch: ranks of one host
    building the same op at once would overwrite each other's library. Here every process gets its own
    directory (host and pid), removed when the process exits.
    """
    base = os.environ.get("MS_COMPILER_CACHE_PATH") or "./custom_kernel_meta/"
    directory = Path(base).resolve() / "ms_nsa_callbacks" / f"{socket.gethostname()}-{os.getpid()}"
    directory.mkdir(parents=True, exist_ok=True)
    atexit.register(shutil.rmtree, str(directory), True)
    return str(directory) + os.sep


def _set_environment(values):
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextlib.contextmanager
def _environment(**values):
    """Sets (or with None, removes) environment variables for the duration of the block."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        _set_environment(values)
        yield
    finally:
        _set_environment(saved)


# -- the Ascend twin --------------------------------------------------------------------------------
TWIN_LIBRARY = "libms_nsa_ascend_twin.so"
TWIN_CANN = Path(__file__).resolve().parent / "twin_cann"


def twin_library() -> str:
    path = Path(__file__).resolve().parent / TWIN_LIBRARY
    if not path.is_file():
        raise ImportError(f"ms_nsa's Ascend twin library {path} is missing: install the package with "
                          f"`pip install .` (or `pip install -e .`), which compiles custom_aot/twin/")
    return str(path)


def twin_entry(op_def: OpDef) -> str:
    """The twin's CPU entry point of an aclnn op (declared with MS_NSA_TWIN_ENTRY in its stand-in file)."""
    return "Twin" + op_def.aclnn[len("aclnn"):]


def _attach_generated_callback(op: ops.Custom, op_def: OpDef) -> None:
    """What Custom.__init__ does for an aclnn op on Ascend (_generate_get_workspace_size_func), for a twin op.

    MindSpore's own header lookup and parser (CustomInfoGenerator) read the twin's stand-in CANN tree,
    its own CustomCodeGenerator writes the callback and its own _compile_aot compiles it; the result is
    set as the same primitive attributes. The shim reads two more: the types joined into one string
    (the CPU kernel's attribute reader has no list-of-str) and the output count.
    """
    with _environment(ASCEND_OPP_PATH=str(TWIN_CANN / "opp"), ASCEND_CUSTOM_OPP_PATH=None,
                      CPLUS_INCLUDE_PATH=str(TWIN_CANN / "include")):
        types = CustomInfoGenerator(op_def.aclnn).get_aclnn_api_types()
        code = CustomCodeGenerator().generate_callback_by_types(op_def.aclnn, op.reg_info, types)
        path = Path(custom_ops._get_cache_path()) / op_def.aclnn / f"{op_def.aclnn}_callback.cc"  # noqa: SLF001
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(code, encoding="utf-8")
        library = custom_ops._compile_aot(str(path.resolve()))  # pylint: disable=protected-access
    op.add_prim_attr("custom_callback_func", f"{library}:{op_def.aclnn}")
    op.add_prim_attr("custom_inputs_type", types[:-2])
    op.add_prim_attr("ms_nsa_twin_inputs_type", ",".join(types[:-2]))
    op.add_prim_attr("ms_nsa_twin_outputs", len(op_def.outputs))


# -- the ops: one construction for every aclnn op ---------------------------------------------------
def check_attrs(op_def: OpDef, values: Mapping[str, Any]) -> Dict[str, Any]:
    """The attributes, checked against the yaml's Ascend rules and normalised to Python scalars."""
    return op_def.check_attrs(dict(values), BACKEND)


def fixed_arguments(op_def: OpDef, attrs: Mapping[str, Any], twin: bool,
                    tensors: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The aclnn arguments that are not call inputs: every scalar (the attributes, else the yaml's
    default: input_layout "TND", actSeqLenType 0, ...) and the tensors the op decides itself (`tensors`:
    a mask, or None for an absent optional input)."""
    fixed = {}
    for arg in op_def.attr_args:
        value = attrs[arg.name] if arg.name in attrs else arg.default
        if arg.kind == "float":
            value = float(value)
        elif arg.kind == "str" and twin:
            # MindSpore's CPU pipeline turns every scalar input of a kernel into a 0-d tensor, and a str has
            # no tensor dtype; the twin passes the characters instead, and its shim rebuilds the char*.
            value = tuple(map(ord, value))
        fixed[arg.name] = value
    fixed.update(tensors or {})
    return fixed


def call_plan(op_def: OpDef, fixed: Mapping[str, Any]) -> Tuple[Tuple[bool, Any], ...]:
    """For each aclnn argument in order: (False, the fixed value) or (True, index of the call input)."""
    inputs = kernel_inputs(op_def)
    return tuple((False, fixed[arg.name]) if arg.name in fixed else (True, inputs.index(arg.name))
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


def zeros_of(*args):
    """A zero of its own kind for each argument: what a bprop returns for its non-differentiable inputs."""
    zeros = ()
    for arg in args:
        zeros = zeros + (zeros_like(arg),)
    return zeros


def _infer(op_def: OpDef, attrs: Mapping[str, Any], derived_dims: Optional[Mapping[str, int]] = None):
    """out_shape / out_dtype callables over all aclnn arguments (None = absent, int arrays as tuples)."""
    single = len(op_def.outputs) == 1

    def infer_shape(*shapes):
        named = {}
        for arg, shape in zip(op_def.args, shapes):
            if shape is None or arg.kind not in ("tensor", "int_array"):
                continue
            named[arg.name] = (len(shape),) if arg.kind == "int_array" else shape
        dims = op_def.bind_dims(named, attrs, BACKEND)
        dims.update(derived_dims or {})
        inferred = op_def.infer_shapes(dims, attrs)
        return inferred[0] if single else tuple(inferred)

    def infer_dtype(*dtypes):
        named = {arg.name: dtype_name(dtype) for arg, dtype in zip(op_def.args, dtypes)
                 if arg.kind == "tensor" and dtype is not None and _is_tensor_type(dtype)}
        op_def.check_dtypes(named, BACKEND)
        inferred = [ms_dtype(dtype) for dtype in op_def.infer_dtypes(named)]
        return inferred[0] if single else tuple(inferred)

    return infer_shape, infer_dtype


def _is_tensor_type(dtype) -> bool:
    return isinstance(dtype, ms.TensorType) or dtype in ms.dtype.all_types


def custom(op_def: OpDef, attrs: Mapping[str, Any], twin: bool, bprop=None,
           derived_dims: Optional[Mapping[str, int]] = None) -> ops.Custom:
    """The Custom primitive over op_def's aclnn op (on Ascend) or its twin stand-in (on the CPU)."""
    infer_shape, infer_dtype = _infer(op_def, attrs, derived_dims)
    with _environment(MS_COMPILER_CACHE_PATH=callback_directory()):
        if twin:
            op = ops.Custom(f"{twin_library()}:{twin_entry(op_def)}", out_shape=infer_shape, out_dtype=infer_dtype,
                            func_type="aot", bprop=bprop, reg_info=reg_info(op_def, twin=True))
            _attach_generated_callback(op, op_def)
            return op
        vendor_types = check_cann_prototype(op_def)
        op = ops.Custom(op_def.aclnn, out_shape=infer_shape, out_dtype=infer_dtype, func_type="aot",
                        bprop=bprop, reg_info=reg_info(op_def))
        if vendor_types:   # MindSpore found no header and typed the callback from reg_info: redo it
            op._generate_get_worspace_size_func_by_types(vendor_types)  # pylint: disable=protected-access
        return op


class _Launch(nn.Cell):
    """The primitive called with every aclnn argument, in a compiled (ms.jit) construct, in PyNative too:
    MindSpore 2.10's PyNative path for Custom aclnn ops (pyboost) handles at most 12 arguments +
    outputs, its graph path (CustomV2AclnnKernelMod) any number."""

    def __init__(self, primitive: ops.Custom, plan):
        super().__init__()
        self.primitive = primitive
        self.plan = plan

    @ms.jit
    def construct(self, *inputs):
        return self.primitive(*aclnn_arguments(self.plan, inputs))


class AclnnCall(nn.Cell):
    """Calls one aclnn Custom primitive with the backend-independent call inputs (`kernel_inputs`, the
    CPU op's inputs), filling in every other aclnn argument from the plan.

    An op adapts its inputs and outputs by overriding `prepare` (checks on the constant lengths, input
    rewrites; returns the inputs and a context of constants) and `finish` (the outputs' layout, given
    that context). They run around the compiled launch, not in it: inside a compiled graph PyNative's
    autodiff sums a zero per element read from the primitive's output tuple into each gradient, an AddN
    that MindSpore's CPU backend lacks for bfloat16 (graph mode optimises it away; PyNative runs them
    eagerly).
    """

    def __init__(self, primitive: ops.Custom, op_def: OpDef, attrs: Mapping[str, Any], twin: bool,
                 tensors: Optional[Mapping[str, Any]] = None):
        super().__init__()
        self.primitive = primitive
        self.plan = call_plan(op_def, fixed_arguments(op_def, attrs, twin, tensors))
        self.launch = _Launch(primitive, self.plan)

    def prepare(self, inputs):
        return inputs, None

    def finish(self, outputs, context):  # pylint: disable=unused-argument
        return outputs

    def construct(self, *inputs):
        inputs, context = self.prepare(inputs)
        return self.finish(self.launch(*inputs), context)


# -- MindSpore's flash-attention gradient, and the twin's stand-in for it ----------------------------
# nsa_compress_attention has no CANN gradient op. Its gradient on Ascend is MindSpore's own
# FlashAttentionScoreGrad (aclnnFlashAttentionUnpaddingScoreGrad) on the compressed K/V, TND, with the
# forward's mask, as torch_npu differentiates npu_nsa_compress_attention. It reads softmax_max/sum in
# the layout NsaCompressAttention writes them (flash attention's own TND default: batch by batch
# [N1, S1_b, 8]; ops-transformer attention/flash_attention_score/op_kernel/
# flash_attention_score_s1s2_bn2gs1_sab.h, softmaxMaxOffset without tndSoftmaxOut) and, for a mask in
# no-compress mode (sparse_mode 0/1), needs it to be exactly [max S1_b, max S2_b]
# (flash_attention_score_grad_tiling_s1s2_bn2gs1s2.cpp, CheckAttenMaskShape).
FLASH_GRAD_TOKENS = 2147483647   # pre/next tokens: no band


def flash_attention_grad_attrs(head_num: int, scale_value: float, has_atten_mask: bool) -> Dict[str, Any]:
    """FlashAttentionScoreGrad's attributes for a softmax-attention gradient with (or without) a full mask."""
    return dict(head_num=head_num, keep_prob=1.0, scale_value=float(scale_value), pre_tokens=FLASH_GRAD_TOKENS,
                next_tokens=FLASH_GRAD_TOKENS, inner_precise=0, input_layout=INPUT_LAYOUT,
                sparse_mode=1 if has_atten_mask else 0)


# Its call inputs in order (MindSpore 2.10 FlashAttentionScoreGrad.__call__) and outputs.
FLASH_GRAD_INPUTS = ("query", "key", "value", "dy", "pse_shift", "drop_mask", "padding_mask", "atten_mask",
                     "softmax_max", "softmax_sum", "softmax_in", "attention_in", "prefix", "actual_seq_qlen",
                     "actual_seq_kvlen")
FLASH_GRAD_OUTPUTS = ("dq", "dk", "dv", "dpse")
TWIN_FLASH_GRAD_ENTRY = "TwinFlashAttentionScoreGrad"


@functools.lru_cache(maxsize=None)
def flash_attention_grad(head_num: int, scale_value: float, has_atten_mask: bool, twin: bool):
    """MindSpore's FlashAttentionScoreGrad primitive (Ascend), or on the twin its stand-in: a CPU Custom
    op of the twin library with the same inputs (in the same order, None where absent) and attributes,
    which records them and computes flash attention's gradient with the CPU core."""
    attrs = flash_attention_grad_attrs(head_num, scale_value, has_atten_mask)
    if not twin:
        from mindspore.ops.auto_generate import FlashAttentionScoreGrad  # pylint: disable=import-outside-toplevel
        return FlashAttentionScoreGrad(**attrs)
    return _twin_flash_attention_grad(attrs)


def _twin_flash_attention_grad(attrs: Mapping[str, Any]) -> ops.Custom:
    reg = CustomRegOp(TWIN_FLASH_GRAD_ENTRY)
    absent = ("pse_shift", "drop_mask", "padding_mask", "softmax_in", "prefix")
    for index, name in enumerate(FLASH_GRAD_INPUTS):
        reg.input(index, name, "optional" if name in absent or name == "atten_mask" else "required")
    for index, name in enumerate(FLASH_GRAD_OUTPUTS):
        reg.output(index, name, "required")
    for dtype in (DataType.F16_Default, DataType.BF16_Default):
        for mask in (DataType.BOOL_Default, DataType.U8_Default, DataType.None_None):
            row = {"atten_mask": mask, "softmax_max": DataType.F32_Default, "softmax_sum": DataType.F32_Default,
                   "actual_seq_qlen": DataType.I64_Default, "actual_seq_kvlen": DataType.I64_Default}
            row.update({name: DataType.None_None for name in absent})
            reg.dtype_format(*(row.get(name, dtype) for name in FLASH_GRAD_INPUTS), dtype, dtype, dtype, dtype)

    def infer_shape(query, key, value, *_):
        return query, key, value, [1]

    def infer_dtype(query, *_):
        return query, query, query, query

    op = ops.Custom(f"{twin_library()}:{TWIN_FLASH_GRAD_ENTRY}", out_shape=infer_shape, out_dtype=infer_dtype,
                    func_type="aot", reg_info=reg.target("CPU").get_op_info())
    for name, value in attrs.items():
        op.add_prim_attr(name, value)
    return op


# -- what several Ascend ops share beyond the call ---------------------------------------------------
def batch_lengths(cumulative: Tuple[int, ...]) -> Tuple[int, ...]:
    """Per-batch lengths from cumulative ones."""
    return tuple(int(end - begin) for begin, end in zip((0,) + tuple(cumulative[:-1]), cumulative))


@functools.lru_cache(maxsize=256)
def _softmax_rows(cu_seq_q: Tuple[int, ...], heads: int) -> np.ndarray:
    """For each (query row t, head n) in ms_nsa's [T1, N1, 8] order, its row in CANN's buffer, which holds
    batch after batch [N1, S1_b, 8] (NsaCompressAttention's and flash attention's TND layout)."""
    rows = []
    for begin, length in zip((0,) + tuple(cu_seq_q[:-1]), batch_lengths(cu_seq_q)):
        local = np.arange(length)[:, None]
        rows.append(begin * heads + np.arange(heads)[None, :] * length + local)
    return np.concatenate(rows).reshape(-1) if rows else np.zeros(0, np.int64)


@functools.lru_cache(maxsize=256)
def _softmax_index(cu_seq_q: Tuple[int, ...], heads: int, to_cann: bool) -> Tensor:
    rows = _softmax_rows(cu_seq_q, heads)
    if to_cann:
        rows = np.argsort(rows, kind="stable")
    return Tensor(rows.astype(np.int32))


def softmax_from_cann(stat, cu_seq_q):
    """softmax_max / softmax_sum [T1, N1, 8] from CANN's batch-by-batch [N1, S1_b, 8] layout into query
    row order (ms_nsa's layout, the CPU backend's): one gather with a compile-time index."""
    t1, heads, width = stat.shape
    index = _softmax_index(tuple(cu_seq_q), heads, False)
    return ops.gather(stat.reshape((t1 * heads, width)), index, 0).reshape((t1, heads, width))


def softmax_to_cann(stat, cu_seq_q):
    """The inverse of softmax_from_cann: ms_nsa's statistics in the layout CANN's kernels read."""
    t1, heads, width = stat.shape
    index = _softmax_index(tuple(cu_seq_q), heads, True)
    return ops.gather(stat.reshape((t1 * heads, width)), index, 0).reshape((t1, heads, width))


# -- the selected pair: aclnnNsaSelectedAttention and aclnnNsaSelectedAttentionGrad -------------------
_SELECTED_ATTRS = ("scale_value", "head_num", "sparse_mode", "select_block_size", "select_block_count")


def _selected_attrs(op_def: OpDef, *values) -> Dict[str, Any]:
    return check_attrs(op_def, dict(zip(_SELECTED_ATTRS, values)))


@functools.lru_cache(maxsize=1024)  # a C-level callable: graph mode calls it at compile time
def _check_batches(function, block_size, block_count, cu_seq_q, cu_seq_kv):
    """CANN's per-batch rules on the lengths (CANN does not check them itself)."""
    if len(cu_seq_q) != len(cu_seq_kv):
        raise ValueError(f"{function}: actual_seq_qlen has {len(cu_seq_q)} batches but actual_seq_kvlen has "
                         f"{len(cu_seq_kv)}; they must have the same length")
    for batch, (q_length, kv_length) in enumerate(zip(batch_lengths(cu_seq_q), batch_lengths(cu_seq_kv))):
        if q_length and (kv_length % block_size or kv_length < block_size * block_count):
            raise ValueError(f"{function}: batch {batch} has {kv_length} keys; on Ascend every batch with "
                             f"queries needs a KV length that is a multiple of select_block_size = "
                             f"{block_size} and at least select_block_size * select_block_count = "
                             f"{block_size * block_count}")


def sort_rows(topk_indices):
    """Each row's block indices in ascending order (exact: indices < 2**24 are exact in float32).

    The math (spec §3) sums over the selection, so the order changes nothing there; CANN's backward
    masks by slot order and agrees with its forward and with the CPU backend only on sorted rows
    (docs/semantics.md, "Where the backends agree").
    """
    return ops.sort(topk_indices.astype(ms.float32), axis=-1)[0].astype(ms.int32)


class SelectedAttentionCall(AclnnCall):
    """The selected pair's call: CANN's batch rules checked, each topk row sorted, the causal mask
    passed exactly when sparse_mode = 2."""

    def __init__(self, primitive: ops.Custom, op_def: OpDef, attrs: Mapping[str, Any], twin: bool):
        super().__init__(primitive, op_def, attrs, twin,
                         tensors={"atten_mask": causal_mask() if attrs["sparse_mode"] == 2 else None})
        inputs = kernel_inputs(op_def)
        self.lengths = (inputs.index("actual_seq_qlen"), inputs.index("actual_seq_kvlen"))
        self.topk = inputs.index("topk_indices")
        self.batch_rule = (op_def.python["function"], attrs["select_block_size"], attrs["select_block_count"])

    def prepare(self, inputs):
        function, block_size, block_count = self.batch_rule
        _check_batches(function, block_size, block_count, inputs[self.lengths[0]], inputs[self.lengths[1]])
        return inputs[:self.topk] + (sort_rows(inputs[self.topk]),) + inputs[self.topk + 1:], None


# lru_cache objects, as on the CPU: graph mode runs them at compile time instead of parsing them.
@functools.lru_cache(maxsize=None, typed=True)
def grad_op(scale_value, head_num, sparse_mode, select_block_size, select_block_count,
            twin=False) -> SelectedAttentionCall:
    op_def = load_op_def(BACKWARD)
    attrs = _selected_attrs(op_def, scale_value, head_num, sparse_mode, select_block_size, select_block_count)
    return SelectedAttentionCall(custom(op_def, attrs, twin), op_def, attrs, twin)


def make_bprop(grad_primitive):
    """The forward primitive's bprop: the gradient primitive, in its own aclnn order.

    MindSpore's bprop parser needs named parameters, the primitive's inputs (the forward's aclnn
    arguments, in order) then out and dout. Gradients flow into query, key and value; softmax_max and
    softmax_sum are not differentiated and every other input gets a zero of its own kind.
    """

    def bprop(query, key, value, topk_indices, atten_mask, actual_seq_qlen, actual_seq_kvlen, scale_value,
              head_num, input_layout, sparse_mode, select_block_size, select_block_count, out, dout):
        softmax_max, softmax_sum, attention_out = out
        dq, dk, dv = grad_primitive(query, key, value, attention_out, dout[2], softmax_max, softmax_sum,
                                    topk_indices, actual_seq_qlen, actual_seq_kvlen, atten_mask, scale_value,
                                    select_block_size, select_block_count, head_num, input_layout, sparse_mode)
        return (dq, dk, dv) + zeros_of(topk_indices, atten_mask, actual_seq_qlen, actual_seq_kvlen, scale_value,
                                       head_num, input_layout, sparse_mode, select_block_size, select_block_count)

    return bprop


@functools.lru_cache(maxsize=None, typed=True)
def forward_op(scale_value, head_num, sparse_mode, select_block_size, select_block_count,
               twin=False) -> SelectedAttentionCall:
    forward_def = load_op_def(FORWARD)
    attrs = _selected_attrs(forward_def, scale_value, head_num, sparse_mode, select_block_size, select_block_count)
    backward = grad_op(*(attrs[name] for name in _SELECTED_ATTRS), twin=twin)
    bprop = make_bprop(backward.primitive)
    return SelectedAttentionCall(custom(forward_def, attrs, twin, bprop=bprop), forward_def, attrs, twin)


def int_array(values) -> Tuple[int, ...]:
    """aclnn takes the cumulative lengths as an aclIntArray, which MindSpore builds from a tuple."""
    return tuple(values)


def check_length_tensor(name, function):
    raise TypeError(f"{function}: on Ascend {name} must be a tuple or list of ints: CANN takes the lengths "
                    f"as host-side integers (aclIntArray), which a device Tensor cannot provide inside a "
                    f"graph")
