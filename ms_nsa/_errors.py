"""Kernel status codes (custom_aot/nsa_core.h `Status`) and the Python exceptions they become."""

# status -> exception type; keep in step with the C++ enum.
_EXCEPTION_FOR_STATUS = {
    1: ValueError,    # kBadProblem
    2: ValueError,    # kBadCumulativeLength
    3: ValueError,    # kBadKvLength
    4: ValueError,    # kIndexOutOfRange
    5: TypeError,     # kUnsupportedDType
    6: RuntimeError,  # kInternal
}


def kernel_exception(op_name: str, status: int, message: str) -> Exception:
    exc_type = _EXCEPTION_FOR_STATUS.get(status, RuntimeError)
    return exc_type(f"{op_name}: {message}")
