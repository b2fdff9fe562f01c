"""nsa_compress and nsa_compress_grad: kernel vs the float64 reference, ms.grad vs autodiff of stock
ops, both modes, determinism, and every rule of ops_yaml/nsa_compress*.yaml as a named error."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

import ms_nsa
from ms_nsa.compress import reference
from ms_nsa.compress.composed import composed_compress, window_rows
from ms_nsa.op_def import load_op_def
from cases import (MS_DTYPES, REL_TOL, assert_same_bits_for_threads, assert_signature, output_bits, rel_error,
                   round_to, to_numpy)

# (segment lengths, heads, head dim, l, d): odd lengths, segments shorter than l (no window), d = l,
# overlapping windows (d < l), a trailing remainder shorter than d.
CASES = {
    "paper-l32-d16": ((45, 7, 100, 33), 3, 32, 32, 16),
    "d-equals-l": ((16, 47, 15), 2, 16, 16, 16),
    "l64-d16": ((131, 63, 64), 1, 48, 64, 16),
    "l128-d64": ((300, 127), 2, 16, 128, 64),
    "l48-d32": ((97, 49, 10), 4, 24, 48, 32),
    "one-segment": ((77,), 2, 128, 32, 16),
}


def make(name, dtype, seed=0):
    lens, heads, dim, block, stride = CASES[name]
    rng = np.random.default_rng(seed)
    tokens = sum(lens)
    x = round_to(rng.standard_normal((tokens, heads, dim)), dtype)
    w = round_to(rng.standard_normal((block, heads)) / block ** 0.5, dtype)
    cumulative = tuple(int(c) for c in np.cumsum(lens)) if len(lens) > 1 else None
    rows = reference.windows(tokens, block, stride, cumulative)
    g = round_to(rng.standard_normal((len(rows), heads, dim)), dtype)
    return dict(x=x, w=w, g=g, block=block, stride=stride, lengths=cumulative, dtype=dtype)


def tensors(c, *names):
    return [Tensor(c[n]).astype(MS_DTYPES[c["dtype"]]) for n in names]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_grad_match_reference(name, dtype):
    c = make(name, dtype)
    x, w, g = tensors(c, "x", "w", "g")
    out = ms_nsa.nsa_compress(x, w, c["block"], c["stride"], actual_seq_len=c["lengths"])
    want = reference.forward(c["x"], c["w"], c["block"], c["stride"], actual_seq_len=c["lengths"])
    assert out.shape == want.shape and out.dtype == x.dtype
    assert rel_error(to_numpy(out), want) < REL_TOL[dtype]
    input_grad, weight_grad = ms_nsa.nsa_compress_grad(g, x, w, c["block"], c["stride"], actual_seq_len=c["lengths"])
    want_input, want_weight = reference.backward(c["g"], c["x"], c["w"], c["block"], c["stride"],
                                                 actual_seq_len=c["lengths"])
    assert input_grad.shape == x.shape and weight_grad.shape == w.shape
    assert rel_error(to_numpy(input_grad), want_input) < REL_TOL[dtype]
    assert rel_error(to_numpy(weight_grad), want_weight) < 2 * REL_TOL[dtype]


def test_tokens_in_no_window_get_zero_gradient():
    c = make("l48-d32", "float32")  # segments 97 (tail 97 - 80 = 17 past the last window), 49, 10
    x, w, g = tensors(c, "x", "w", "g")
    input_grad, _ = ms_nsa.nsa_compress_grad(g, x, w, c["block"], c["stride"], actual_seq_len=c["lengths"])
    covered = np.zeros(x.shape[0], bool)
    for start in reference.windows(x.shape[0], c["block"], c["stride"], c["lengths"]):
        covered[start:start + c["block"]] = True
    assert not covered[97 + 48:].any() and covered[:80].all()
    assert np.all(input_grad.asnumpy()[~covered] == 0) and np.all(np.abs(input_grad.asnumpy()[covered]).sum(-1) > 0)


class Compress(nn.Cell):
    def __init__(self, block, stride, lengths, weights, tokens, composed=False):
        super().__init__()
        self.block, self.stride, self.lengths, self.weights = block, stride, lengths, weights
        self.composed = composed
        self.rows = window_rows(tokens, block, stride, lengths) if composed else None

    def construct(self, x, w):
        if self.composed:
            out = composed_compress(x, w, self.rows)
        else:
            out = ms_nsa.nsa_compress(x, w, self.block, self.stride, actual_seq_len=self.lengths)
        return (out.astype(ms.float32) * self.weights).sum()


@pytest.mark.parametrize("name", ["paper-l32-d16", "l48-d32"])
def test_ms_grad_matches_composed_autodiff(mode, name):
    c = make(name, "float32")
    x, w = tensors(c, "x", "w")
    weights = Tensor(c["g"])
    cell = lambda composed: Compress(c["block"], c["stride"], c["lengths"], weights, x.shape[0], composed)  # noqa: E731
    got = ms.grad(cell(False), grad_position=(0, 1))(x, w)
    want = ms.grad(cell(True), grad_position=(0, 1))(x, w)
    for g_, w_ in zip(got, want):
        assert rel_error(g_.asnumpy(), w_.asnumpy()) < 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_mode_gives_the_same_bits_and_threads_do_not_matter(dtype):
    c = make("paper-l32-d16", dtype)
    x, w, g = tensors(c, "x", "w", "g")

    @ms.jit
    def both(x, w, g):
        out = ms_nsa.nsa_compress(x, w, c["block"], c["stride"], actual_seq_len=c["lengths"])
        return (out,) + tuple(ms_nsa.nsa_compress_grad(g, x, w, c["block"], c["stride"], actual_seq_len=c["lengths"]))

    def eager():
        out = ms_nsa.nsa_compress(x, w, c["block"], c["stride"], actual_seq_len=c["lengths"])
        return (out,) + tuple(ms_nsa.nsa_compress_grad(g, x, w, c["block"], c["stride"], actual_seq_len=c["lengths"]))

    expected = output_bits(eager())
    assert output_bits(both(x, w, g)) == expected
    assert_same_bits_for_threads(eager, expected)


def test_signatures_are_the_yamls_and_supersets_of_mindspores():
    # mindspore.ops.nsa_compress(input, weight, compress_block_size, compress_stride, *, actual_seq_len)
    assert_signature(ms_nsa.nsa_compress, ["input", "weight", "compress_block_size", "compress_stride",
                                           "actual_seq_len"])
    assert_signature(ms_nsa.nsa_compress_grad, None)


def _bad_calls():
    x = Tensor(np.zeros((40, 2, 16), np.float32))
    w = Tensor(np.zeros((32, 2), np.float32))
    g = Tensor(np.zeros((1, 2, 16), np.float32))
    f = ms_nsa.nsa_compress
    return [
        ("input not a Tensor", lambda: f(np.zeros((40, 2, 16)), w, 32, 16), TypeError, "input must be a mindspore Tensor"),
        ("input rank", lambda: f(Tensor(np.zeros((40, 32), np.float32)), w, 32, 16), ValueError, "input must have shape"),
        ("weight rows != l", lambda: f(x, Tensor(np.zeros((16, 2), np.float32)), 32, 16), ValueError,
         "weight.shape[0] is 16 but must equal compress_block_size = 32"),
        ("weight heads != N", lambda: f(x, Tensor(np.zeros((32, 3), np.float32)), 32, 16), ValueError, "dimension N"),
        ("weight dtype", lambda: f(x, Tensor(np.zeros((32, 2), np.float16)), 32, 16), TypeError,
         "weight has dtype float16 but must have the dtype of input"),
        ("int input", lambda: f(Tensor(np.zeros((40, 2, 16), np.int32)), w, 32, 16), TypeError, "input has dtype int32"),
        ("l not a multiple of 16", lambda: f(x, Tensor(np.zeros((24, 2), np.float32)), 24, 16), ValueError,
         "compress_block_size = 24 is not allowed"),
        ("l above 128", lambda: f(x, Tensor(np.zeros((144, 2), np.float32)), 144, 16), ValueError,
         "compress_block_size = 144 is not allowed"),
        ("d above l", lambda: f(x, Tensor(np.zeros((16, 2), np.float32)), 16, 32), ValueError,
         "compress_stride = 32 must be at most compress_block_size = 16"),
        ("d not a multiple of 16", lambda: f(x, w, 32, 8), ValueError, "compress_stride = 8 is not allowed"),
        ("l a float", lambda: f(x, w, 32.0, 16), TypeError, "compress_block_size must be an int"),
        ("lengths a Tensor", lambda: f(x, w, 32, 16, actual_seq_len=Tensor(np.array([40], np.int64))), TypeError,
         "actual_seq_len must be a tuple or list of ints (or None), not a Tensor"),
        ("lengths decreasing", lambda: f(x, w, 32, 16, actual_seq_len=(30, 20, 40)), ValueError,
         "actual_seq_len[1] = 20 is smaller than the entry before it"),
        ("lengths short of T", lambda: f(x, w, 32, 16, actual_seq_len=(20, 39)), ValueError,
         "must end at the token count 40"),
        ("lengths not ints", lambda: f(x, w, 32, 16, actual_seq_len=(20.0, 40)), TypeError,
         "actual_seq_len must be a tuple or list of ints"),
        ("D above 512 on the CPU", lambda: f(Tensor(np.zeros((40, 1, 520), np.float32)),
                                           Tensor(np.zeros((32, 1), np.float32)), 32, 16), ValueError,
         "D = 520 (from input.shape[2]) is not supported on cpu"),
        ("N above 128", lambda: f(Tensor(np.zeros((40, 130, 16), np.float32)),
                                Tensor(np.zeros((32, 130), np.float32)), 32, 16), ValueError, "N = 130"),
        ("grad rows != windows", lambda: ms_nsa.nsa_compress_grad(Tensor(np.zeros((3, 2, 16), np.float32)), x, w, 32,
                                                                 16), ValueError, "grad has 3 rows but"),
        ("grad rows != windows (Tensor lengths, kernel check)",
         lambda: ms_nsa.nsa_compress_grad(Tensor(np.zeros((3, 2, 16), np.float32)), x, w, 32, 16,
                                          actual_seq_len=Tensor(np.array([40], np.int64))), ValueError,
         "the output has 3 rows but actual_seq_len gives 1 windows"),
        ("grad lengths decreasing (kernel check)",
         lambda: ms_nsa.nsa_compress_grad(g, x, w, 32, 16, actual_seq_len=Tensor(np.array([30, 20, 40], np.int64))),
         ValueError, "actual_seq_len[1] = 20 is smaller than the entry before it"),
        ("grad shape", lambda: ms_nsa.nsa_compress_grad(Tensor(np.zeros((1, 2, 8), np.float32)), x, w, 32, 16),
         ValueError, "dimension D"),
    ]


@pytest.mark.parametrize("what, call, exc, message", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_input_raises_a_named_error(what, call, exc, message):
    with pytest.raises(exc) as info:
        call()
    assert message in str(info.value), f"{what}: {info.value}"


def test_ascend_rules_of_the_yaml():
    # The CANN contract the CPU relaxes (D a multiple of 16 up to 256; fp16/bf16 only), as the Ascend
    # backend will check it.
    op_def = load_op_def("nsa_compress")
    with pytest.raises(ValueError, match="D = 24 .* not supported on ascend"):
        op_def.bind_dims({"input": (40, 2, 24)}, {}, "ascend")
    with pytest.raises(TypeError, match="allowed on ascend: float16, bfloat16"):
        op_def.check_dtypes({"input": "float32"}, "ascend")
