"""Runs random invalid calls of the public API and checks each fails cleanly; run in a subprocess by
tests/test_fuzz.py, so that a crash (segfault, abort) fails that test instead of killing the suite.

    python tests/fuzz_invalid_worker.py --mode pynative|graph --examples N

Prints one line per case before running it (the last line names the culprit after a crash) and a
final JSON summary: {"kind": count, ...}. Exit code 0 only if every call raised the expected
exception with a message naming what was wrong.
"""
import argparse
import json
import os
import sys

import numpy as np
import mindspore as ms
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mindspore import Tensor

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's ms_nsa
import ms_nsa  # noqa: E402
from cases import MS_DTYPES  # noqa: E402
from fuzz_problems import CORRUPTIONS, GRAD_CORRUPTIONS, KERNEL, valid_cases  # noqa: E402
from graph_cells import Backward, Forward  # noqa: E402

ATTRS = ("scale_value", "head_num", "select_block_size", "select_block_count")
STAT_NAMES = ("softmax_max", "softmax_sum")


def build_call(case, grad):
    """The public function's arguments for a valid problem, as NumPy (converted to Tensors later)."""
    d = case.data
    call = dict(query=d["q"], key=d["k"], value=d["v"], topk_indices=d["topk"], scale_value=case.scale_value,
                head_num=case.q_heads, select_block_size=case.select_block_size,
                select_block_count=case.select_block_count, sparse_mode=case.sparse_mode, atten_mask=None,
                **case.lengths())
    if grad:
        out, softmax_max, softmax_sum = ms_nsa.reference.forward(d["q"], d["k"], d["v"], d["topk"], *case.attrs,
                                                                 sparse_mode=case.sparse_mode, **case.lengths())
        call.update(grad=d["d_out"], attention_out=out.astype(np.float32),
                    softmax_max=softmax_max.astype(np.float32), softmax_sum=softmax_sum.astype(np.float32))
    return call


def to_tensors(call, case):
    def convert(name, value):
        if not isinstance(value, np.ndarray):
            return value
        if name in ("actual_seq_qlen", "actual_seq_kvlen", "atten_mask", "topk_indices") or \
                name in STAT_NAMES or value.dtype != np.float32:
            return Tensor(value)
        return Tensor(value).astype(MS_DTYPES[case.dtype])  # float32 data -> the case's dtype
    return {name: convert(name, value) for name, value in call.items()}


def invoke(call, grad, mode):
    positional = (["grad", "query", "key", "value", "attention_out", "softmax_max", "softmax_sum"] if grad
                  else ["query", "key", "value"]) + ["topk_indices"]
    function = ms_nsa.nsa_select_attention_grad if grad else ms_nsa.nsa_select_attention
    if mode == "pynative":
        outputs = function(*(call[n] for n in positional), *(call[a] for a in ATTRS),
                           atten_mask=call["atten_mask"], actual_seq_qlen=call["actual_seq_qlen"],
                           actual_seq_kvlen=call["actual_seq_kvlen"], sparse_mode=call["sparse_mode"])
    else:  # a compiled Cell; tuples and None become graph constants, Tensors graph inputs
        cell = (Backward if grad else Forward)(*(call[a] for a in ATTRS), sparse_mode=call["sparse_mode"])
        outputs = cell(*(call[n] for n in positional), actual_seq_qlen=call["actual_seq_qlen"],
                       actual_seq_kvlen=call["actual_seq_kvlen"], atten_mask=call["atten_mask"])
    for x in outputs:
        x.asnumpy()


def run_kind(kind, corrupt, exc_types, words, grad_only, mode, examples, counts):
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=valid_cases(), grad=st.just(True) if grad_only else st.booleans(), data=st.data())
    def check(case, grad, data):
        case.make()
        call = build_call(case, grad)
        corrupt(call, case, data)
        print(f"case {kind} grad={grad} {case!r}", flush=True)
        allowed = exc_types + ((RuntimeError,) if mode == "graph" and exc_types == KERNEL else ())
        try:
            invoke(to_tensors(call, case), grad, mode)
        except allowed as err:
            message = str(err)
            assert any(w in message for w in words), f"{kind}: message {message[:300]!r} lacks {words}"
            counts[kind] = counts.get(kind, 0) + 1
            return
        except Exception as err:  # a wrong exception type is a failure too
            raise AssertionError(f"{kind}: expected {allowed}, got {type(err).__name__}: {str(err)[:300]}")
        raise AssertionError(f"{kind}: the call succeeded on invalid input")

    check()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["pynative", "graph"], default="pynative")
    parser.add_argument("--examples", type=int, default=5, help="examples per kind of corruption")
    args = parser.parse_args()
    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    counts = {}
    failures = []
    kinds = [c + (False,) for c in CORRUPTIONS] + [c + (True,) for c in GRAD_CORRUPTIONS]
    for kind, corrupt, exc_types, words, graph_too, grad_only in kinds:
        if args.mode == "graph" and not graph_too:
            continue
        try:
            run_kind(kind, corrupt, exc_types, words, grad_only, args.mode, args.examples, counts)
        except AssertionError as err:
            failures.append(f"{kind}: {err}")
    print("SUMMARY " + json.dumps(counts, sort_keys=True), flush=True)
    for failure in failures:
        print("FAILURE " + failure[:2000], flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
