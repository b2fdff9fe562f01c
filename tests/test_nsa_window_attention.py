"""nsa_window_attention and its gradient: kernel vs the float64 reference (forward and backward, varlen,
GQA, dtypes), ms.grad vs autodiff of stock ops in both modes, determinism across thread counts,
isolation of packed sequences, causality and the window's reach, and every rule as a named error."""
import inspect

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

import ms_nsa
from ms_nsa.op_def import load_op_def
from ms_nsa.window import api, reference
from ms_nsa.window.composed import composed_window_attention, sequence_starts
from cases import MS_DTYPES, REL_TOL, rel_error, round_to, to_numpy
from test_kernel_isa import FORCED_ISAS, run_forced

# The backward chains more roundings (dS, and dO / O enter in the input dtype): 2x the room, as for
# nsa_select_attention_grad.
GRAD_TOL = {dtype: 2 * tol for dtype, tol in REL_TOL.items()}

# (sequence lengths, N1, N2, D, Dv, window): an empty and a one-token sequence, windows shorter than,
# equal to and longer than a key tile or a sequence, G from 1 to 32, Dv != D.
CASES = {
    "varlen-gqa": ((37, 1, 0, 70), 4, 2, 32, 16, 16),
    "window-spans-tiles": ((130, 65), 8, 1, 64, 64, 40),
    "window-beyond-sequence": ((200,), 16, 1, 24, 8, 300),
    "mha-short-window": ((77, 50), 3, 3, 20, 12, 5),
    "g32": ((40, 9), 32, 1, 16, 16, 24),
    "odd-window": ((333, 77), 4, 2, 64, 32, 70),
    "paper-window": ((600,), 2, 1, 32, 32, 512),
}


def make(name, dtype="float32", seed=0):
    lens, q_heads, kv_heads, dim, v_dim, window = CASES[name]
    rng = np.random.default_rng(seed)
    tokens = sum(lens)
    data = dict(q=rng.standard_normal((tokens, q_heads, dim)), k=rng.standard_normal((tokens, kv_heads, dim)),
                v=rng.standard_normal((tokens, kv_heads, v_dim)), g=rng.standard_normal((tokens, q_heads, v_dim)))
    case = {key: round_to(value, dtype) for key, value in data.items()}
    case.update(lengths=tuple(int(c) for c in np.cumsum(lens)), heads=q_heads, window=window,
                scale=dim ** -0.5, dtype=dtype)
    return case


def tensors(c, *names):
    return [Tensor(c[n]).astype(MS_DTYPES[c["dtype"]]) for n in names]


def forward(c, q, k, v, lengths=None):
    return ms_nsa.nsa_window_attention(q, k, v, c["scale"], c["heads"], c["window"],
                                       actual_seq_len=c["lengths"] if lengths is None else lengths)


def backward(c, g, q, k, v, outputs, lengths=None):
    out, softmax_max, softmax_sum = outputs
    return ms_nsa.nsa_window_attention_grad(g, q, k, v, out, softmax_max, softmax_sum, c["scale"], c["heads"],
                                            c["window"], actual_seq_len=c["lengths"] if lengths is None else lengths)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_grad_match_reference(name, dtype):
    c = make(name, dtype)
    q, k, v, g = tensors(c, "q", "k", "v", "g")
    outputs = forward(c, q, k, v)
    out, softmax_max, softmax_sum = outputs
    want_out, want_max, want_sum = reference.forward(c["q"], c["k"], c["v"], c["scale"], c["heads"], c["window"],
                                                     actual_seq_len=c["lengths"])
    assert out.shape == want_out.shape and out.dtype == q.dtype
    assert softmax_max.shape == want_max.shape and softmax_max.dtype == ms.float32
    err = rel_error(to_numpy(out), want_out)
    assert err < REL_TOL[dtype], f"attention_out: relative error {err:.3e} over {REL_TOL[dtype]:.0e}"
    np.testing.assert_allclose(to_numpy(softmax_max), want_max, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_numpy(softmax_sum), want_sum, rtol=1e-5)

    grads = backward(c, g, q, k, v, outputs)
    # The reference backward reads the same forward outputs the kernel was given.
    want = reference.backward(c["g"], c["q"], c["k"], c["v"], to_numpy(out), to_numpy(softmax_max),
                              to_numpy(softmax_sum), c["scale"], c["heads"], c["window"], actual_seq_len=c["lengths"])
    for label, got, expected, like in zip(("dq", "dk", "dv"), grads, want, (q, k, v)):
        assert got.shape == like.shape and got.dtype == like.dtype
        err = rel_error(to_numpy(got), expected)
        assert err < GRAD_TOL[dtype], f"{label}: relative error {err:.3e} over {GRAD_TOL[dtype]:.0e}"


def test_window_of_one_is_the_value_row():
    # Each query sees only itself: out = v of its KV head, dq = dk = 0 (P is 1 whatever the scores),
    # dv = the sum of the G heads' incoming gradients.
    c = make("varlen-gqa")
    c["window"] = 1
    q, k, v, g = tensors(c, "q", "k", "v", "g")
    outputs = forward(c, q, k, v)
    np.testing.assert_allclose(to_numpy(outputs[0]), np.repeat(c["v"], 2, axis=1), rtol=0, atol=1e-6)
    dq, dk, dv = backward(c, g, q, k, v, outputs)
    assert np.abs(to_numpy(dq)).max() < 1e-5 and np.abs(to_numpy(dk)).max() < 1e-5
    np.testing.assert_allclose(to_numpy(dv), c["g"].reshape(c["g"].shape[0], 2, 2, -1).sum(axis=2), atol=1e-6)


def test_packed_sequences_are_isolated():
    # Each sequence of a packed batch gives bitwise what it gives alone, forward and backward.
    c = make("odd-window")
    q, k, v, g = tensors(c, "q", "k", "v", "g")
    packed = forward(c, q, k, v)
    packed_grads = backward(c, g, q, k, v, packed)
    begin = 0
    for end in c["lengths"]:
        rows = slice(begin, end)
        alone = forward(c, q[rows], k[rows], v[rows], lengths=(end - begin,))
        alone_grads = backward(c, g[rows], q[rows], k[rows], v[rows], alone, lengths=(end - begin,))
        for whole, part in zip(packed + tuple(packed_grads), alone + tuple(alone_grads)):
            np.testing.assert_array_equal(whole.asnumpy()[rows], part.asnumpy())
        begin = end


def test_outputs_depend_on_no_later_token_and_no_token_beyond_the_window():
    c = make("window-spans-tiles")
    q, k, v = tensors(c, "q", "k", "v")
    base = [x.asnumpy() for x in forward(c, q, k, v)]
    rng = np.random.default_rng(1)
    cut, window = 60, c["window"]

    def perturbed(rows):
        changed = []
        for name in ("q", "k", "v"):
            x = c[name].copy()
            x[rows] = rng.standard_normal(x[rows].shape)
            changed.append(Tensor(x.astype(np.float32)))
        return [x.asnumpy() for x in forward(c, *changed)]

    # Causal: changing every token from `cut` on leaves all earlier rows bitwise unchanged.
    for got, want in zip(perturbed(slice(cut, None)), base):
        np.testing.assert_array_equal(got[:cut], want[:cut])
    # Window: changing tokens before `cut` leaves rows that reach no further back than `cut` unchanged.
    after = perturbed(slice(0, cut))
    reach = cut + window - 1
    for got, want in zip(after, base):
        np.testing.assert_array_equal(got[reach:130], want[reach:130])
        assert not np.array_equal(got[cut:reach], want[cut:reach])


def test_gradient_reaches_no_later_key():
    # A loss on the first rows only: keys after them get exactly zero gradient.
    c = make("window-spans-tiles")
    q, k, v = tensors(c, "q", "k", "v")
    g = c["g"].copy()
    g[50:] = 0
    outputs = forward(c, q, k, v)
    dq, dk, dv = backward(c, Tensor(g.astype(np.float32)), q, k, v, outputs)
    assert np.all(dk.asnumpy()[50:] == 0) and np.all(dv.asnumpy()[50:] == 0) and np.all(dq.asnumpy()[50:] == 0)
    assert np.all(np.abs(dv.asnumpy()[:50]).sum(-1) > 0)


def test_lengths_as_tensor_equal_tuple():
    c = make("varlen-gqa")
    q, k, v, g = tensors(c, "q", "k", "v", "g")
    as_tensor = Tensor(np.array(c["lengths"], np.int64))
    by_tuple, by_tensor = forward(c, q, k, v), forward(c, q, k, v, lengths=as_tensor)
    grads_tuple, grads_tensor = backward(c, g, q, k, v, by_tuple), backward(c, g, q, k, v, by_tensor, as_tensor)
    for a, b in zip(by_tuple + tuple(grads_tuple), by_tensor + tuple(grads_tensor)):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())


class Loss(nn.Cell):
    """sum(attention_out * weights): a loss whose gradient with respect to attention_out is `weights`."""

    def __init__(self, c, weights, composed=False):
        super().__init__()
        self.weights = weights
        self.composed = composed
        self.scale, self.window = c["scale"], c["window"]
        self.attention = ms_nsa.nn.NsaWindowAttention(c["heads"], c["window"])
        self.starts = sequence_starts(c["q"].shape[0], c["lengths"])

    def construct(self, query, key, value, actual_seq_len):
        if self.composed:
            out = composed_window_attention(query, key, value, self.scale, self.window, self.starts)
        else:
            out = self.attention(query, key, value, actual_seq_len)
        return (out.astype(ms.float32) * self.weights).sum()


@pytest.mark.parametrize("name", ["varlen-gqa", "mha-short-window", "window-beyond-sequence"])
def test_ms_grad_through_the_cell_matches_composed_autodiff(mode, name):
    c = make(name)
    q, k, v = tensors(c, "q", "k", "v")
    lengths = Tensor(np.array(c["lengths"], np.int64))
    weights = Tensor(c["g"].astype(np.float32))
    got = ms.grad(Loss(c, weights), grad_position=(0, 1, 2))(q, k, v, lengths)
    want = ms.grad(Loss(c, weights, composed=True), grad_position=(0, 1, 2))(q, k, v, lengths)
    for label, a, b in zip(("dq", "dk", "dv"), got, want):
        err = rel_error(a.asnumpy(), b.asnumpy())
        assert err < 1e-5, f"{label}: ms.grad through the Cell differs from stock-op autodiff by {err:.3e}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_mode_gives_the_same_bits_and_threads_do_not_matter(dtype):
    c = make("odd-window", dtype)
    q, k, v, g = tensors(c, "q", "k", "v", "g")

    def both(q, k, v, g):
        outputs = forward(c, q, k, v)
        return outputs + tuple(backward(c, g, q, k, v, outputs))

    bits = lambda outs: [to_numpy(o).tobytes() for o in outs]  # noqa: E731
    previous = ms_nsa.get_num_threads()
    try:
        ms_nsa.set_num_threads(1)
        reference_bits = bits(both(q, k, v, g))
        for threads in (2, 3):
            ms_nsa.set_num_threads(threads)
            assert bits(both(q, k, v, g)) == reference_bits, f"{threads} threads differ from 1"
        assert bits(ms.jit(both)(q, k, v, g)) == reference_bits, "graph mode differs from PyNative"
    finally:
        ms_nsa.set_num_threads(previous)


def test_signatures_are_the_yamls():
    for function in (ms_nsa.nsa_window_attention, ms_nsa.nsa_window_attention_grad):
        op_def = load_op_def(function.__name__)
        params = inspect.signature(function).parameters
        assert [p for p in params if params[p].kind == params[p].POSITIONAL_OR_KEYWORD] == op_def.python["positional"]
        assert [p for p in params if params[p].kind == params[p].KEYWORD_ONLY] == op_def.python["keyword"]


def _bad_calls():
    q = Tensor(np.zeros((40, 4, 16), np.float32))
    k = Tensor(np.zeros((40, 2, 16), np.float32))
    v = Tensor(np.zeros((40, 2, 8), np.float32))
    out = Tensor(np.zeros((40, 4, 8), np.float32))
    stats = Tensor(np.ones((40, 4, 8), np.float32))
    f, grad = ms_nsa.nsa_window_attention, ms_nsa.nsa_window_attention_grad
    lengths = lambda *values: Tensor(np.array(values, np.int64))  # noqa: E731
    return [
        ("query not a Tensor", lambda: f(np.zeros((40, 4, 16)), k, v, 0.25, 4, 8), TypeError,
         "query must be a mindspore Tensor"),
        ("query 4-D", lambda: f(Tensor(np.zeros((1, 40, 4, 16), np.float32)), k, v, 0.25, 4, 8), ValueError,
         "query must have shape [T, N1, D]"),
        ("key of other tokens", lambda: f(q, Tensor(np.zeros((39, 2, 16), np.float32)), v, 0.25, 4, 8), ValueError,
         "both are the dimension T"),
        ("key head dim", lambda: f(q, Tensor(np.zeros((40, 2, 8), np.float32)), v, 0.25, 4, 8), ValueError,
         "both are the dimension D"),
        ("N1 not a multiple of N2", lambda: f(Tensor(np.zeros((40, 3, 16), np.float32)), k, v, 0.25, 3, 8), ValueError,
         "N1 = 3 (query.shape[1]) must be a multiple of N2 = 2"),
        ("head_num != N1", lambda: f(q, k, v, 0.25, 8, 8), ValueError, "head_num = 8 must equal N1 = 4"),
        ("window_size 0", lambda: f(q, k, v, 0.25, 4, 0), ValueError, "window_size = 0 is not allowed"),
        ("window_size a float", lambda: f(q, k, v, 0.25, 4, 8.0), TypeError, "window_size must be an int"),
        ("scale_value infinite", lambda: f(q, k, v, float("inf"), 4, 8), ValueError, "scale_value must be finite"),
        ("int query", lambda: f(Tensor(np.zeros((40, 4, 16), np.int32)), k, v, 0.25, 4, 8), TypeError,
         "query has dtype int32"),
        ("key dtype", lambda: f(q, Tensor(np.zeros((40, 2, 16), np.float16)), v, 0.25, 4, 8), TypeError,
         "key has dtype float16 but must have the dtype of query"),
        ("D above 512", lambda: f(Tensor(np.zeros((4, 1, 520), np.float32)), Tensor(np.zeros((4, 1, 520), np.float32)),
                                  Tensor(np.zeros((4, 1, 8), np.float32)), 0.25, 1, 8), ValueError,
         "D = 520 (from query.shape[2]) is not supported on cpu"),
        ("lengths decreasing", lambda: f(q, k, v, 0.25, 4, 8, actual_seq_len=(30, 20, 40)), ValueError,
         "actual_seq_len[1] = 20 is smaller than the entry before it"),
        ("lengths short of T", lambda: f(q, k, v, 0.25, 4, 8, actual_seq_len=(20, 39)), ValueError,
         "must end at the token count 40"),
        ("lengths not ints", lambda: f(q, k, v, 0.25, 4, 8, actual_seq_len=(20.5, 40)), TypeError,
         "actual_seq_len must be a tuple or list of ints"),
        ("length tensor of floats", lambda: f(q, k, v, 0.25, 4, 8, actual_seq_len=Tensor(np.array([40.0]))), TypeError,
         "actual_seq_len must be a 1-D int32/int64 Tensor"),
        ("length tensor decreasing (kernel check)", lambda: f(q, k, v, 0.25, 4, 8, actual_seq_len=lengths(30, 20, 40)),
         ValueError, "actual_seq_len[1] = 20 is smaller than the entry before it"),
        ("length tensor short of T (kernel check)", lambda: f(q, k, v, 0.25, 4, 8, actual_seq_len=lengths(20, 39)),
         ValueError, "actual_seq_len[-1] = 39 must equal T = 40"),
        ("grad shape", lambda: grad(Tensor(np.zeros((40, 4, 16), np.float32)), q, k, v, out, stats, stats, 0.25, 4, 8),
         ValueError, "dimension Dv"),
        ("statistics dtype", lambda: grad(out, q, k, v, out, Tensor(np.ones((40, 4, 8), np.float16)), stats, 0.25, 4,
                                          8), TypeError, "softmax_max has dtype float16"),
        ("statistics width", lambda: grad(out, q, k, v, out, Tensor(np.ones((40, 4, 1), np.float32)), stats, 0.25, 4,
                                          8), ValueError, "softmax_max.shape[2] must be 8"),
        ("grad lengths decreasing (kernel check)",
         lambda: grad(out, q, k, v, out, stats, stats, 0.25, 4, 8, actual_seq_len=lengths(30, 20, 40)), ValueError,
         "actual_seq_len[1] = 20 is smaller than the entry before it"),
        ("Cell window_size", lambda: ms_nsa.nn.NsaWindowAttention(4, -1), ValueError, "window_size = -1 is not allowed"),
        ("no Ascend kernel yet", lambda: api._forward_op(0.25, 4, 8, "ascend"), NotImplementedError,
         "only the CPU backend is implemented so far"),
    ]


@pytest.mark.parametrize("what, call, exc, message", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_input_raises_a_named_error(what, call, exc, message):
    with pytest.raises(exc) as info:
        call()
    assert message in str(info.value), f"{what}: {info.value}"
    assert "nsa_window_attention" in str(info.value) or what.startswith("Cell"), f"{what}: {info.value}"


# The lesser instruction sets of this architecture (test_kernel_isa.FORCED_ISAS: AVX2 and baseline, or NEON and baseline), in
# a child process: errors vs the reference and the same bits for 1 and 3 threads, on shapes whose
# widths are no multiple of the vector (D 20, Dv 12, G 3) and that span tiles.
ISA_CHILD = r"""
import json
import numpy as np
import mindspore as ms
ms.set_device("CPU")
import ms_nsa
from ms_nsa.window import reference
from cases import rel_error, to_numpy
from test_nsa_window_attention import backward, forward, make, tensors

errors, same_bits = {}, True
for dtype in ("float32", "float16", "bfloat16"):
    for name in ("mha-short-window", "odd-window", "g32"):
        c = make(name, dtype)
        q, k, v, g = tensors(c, "q", "k", "v", "g")
        ms_nsa.set_num_threads(1)
        outs = forward(c, q, k, v)
        grads = backward(c, g, q, k, v, outs)
        want = reference.forward(c["q"], c["k"], c["v"], c["scale"], c["heads"], c["window"], actual_seq_len=c["lengths"])
        want_grads = reference.backward(c["g"], c["q"], c["k"], c["v"], *(to_numpy(o) for o in outs), c["scale"],
                                        c["heads"], c["window"], actual_seq_len=c["lengths"])
        errors[f"{dtype}/{name}"] = [rel_error(to_numpy(outs[0]), want[0])] + [
            rel_error(to_numpy(a), b) for a, b in zip(grads, want_grads)]
        ms_nsa.set_num_threads(3)
        outs3 = forward(c, q, k, v)
        for a, b in zip(outs + tuple(grads), outs3 + tuple(backward(c, g, q, k, v, outs3))):
            same_bits &= a.asnumpy().tobytes() == b.asnumpy().tobytes()
import ctypes
from ms_nsa._cpu_kernels import library_path
lib = ctypes.CDLL(library_path())
lib.ms_nsa_kernel_isa.restype = ctypes.c_char_p
print(json.dumps({"isa": lib.ms_nsa_kernel_isa().decode(), "errors": errors, "same_bits": same_bits}))
"""


@pytest.mark.parametrize("isa", FORCED_ISAS)
def test_forced_instruction_set_matches_reference(isa):
    run_forced(isa, ISA_CHILD)


def test_graph_mode_errors_name_the_argument():
    c = make("varlen-gqa")
    q, k, v = tensors(c, "q", "k", "v")

    @ms.jit
    def call(q, k, v, lengths):
        return ms_nsa.nsa_window_attention(q, k, v, c["scale"], c["heads"], c["window"], actual_seq_len=lengths)

    # A shape rule fails at compile time with the yaml's message ...
    with pytest.raises(ValueError, match="both are the dimension T"):
        call(q, k[:-1], v[:-1], Tensor(np.array(c["lengths"], np.int64)))
    # ... a data rule in the kernel, with the kernel's message inside MindSpore's RuntimeError (raised
    # when the asynchronous launch is waited for).
    with pytest.raises(RuntimeError, match=r"actual_seq_len\[1\] = 20 is smaller than the entry before it"):
        call(q, k, v, Tensor(np.array([30, 20, 38, 108], np.int64)))[0].asnumpy()
