"""MindSpore dtypes <-> the dtype names ops_yaml/ uses ("float16", "int32", ...), for both backends."""
import mindspore as ms

_NAMES = {
    ms.float32: "float32", ms.float16: "float16", ms.bfloat16: "bfloat16", ms.float64: "float64",
    ms.int32: "int32", ms.int64: "int64", ms.int8: "int8", ms.int16: "int16", ms.uint8: "uint8",
    ms.bool_: "bool",
}
_DTYPES = {name: dtype for dtype, name in _NAMES.items()}


def dtype_name(dtype) -> str:
    """'float16' etc. for a MindSpore dtype or a tensor type (what infer callables receive)."""
    if isinstance(dtype, ms.TensorType):
        dtype = dtype.element_type()
    return _NAMES.get(dtype, str(dtype).lower())


def ms_dtype(name: str):
    """The MindSpore dtype of a yaml dtype name."""
    return _DTYPES[name]
