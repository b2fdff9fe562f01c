"""Demo: a small NSA language model learns long-range recall in GRAPH_MODE; then the op is checked.

The task (multi-key recall): each sequence is noise tokens in which NUM_KEYS "needles" are planted,
each a single token that binds a key to a random value, all within a short stretch far back. The
sequence ends with query tokens, each naming a key; at a query the model must output that key's
value. The needles are always further back than the sliding window reaches, and several share a
block, so a block summary mixes their values: the model has to rank the right block with the
compressed branch, select it, and read the one matching token inside it with the selected branch
(ms_nsa's NsaSelectAttention op). Two models are trained the same way, on the same batches:

- NSA: ms_nsa.nn.NativeSparseAttention with its three branches;
- window-only baseline: the same layer with only the sliding-window branch.

Batches are packed varlen sequences with new lengths every step (lengths as a Tensor, so the graph
compiles once). The run writes a loss/accuracy plot to --out (default out/demo/) and ends by checking
the op against the float64 reference in all dtypes.

    python -m ms_nsa.demo [--steps 500] [--seed 0] [--out out/demo]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn, ops

import ms_nsa

# Vocabulary: noise tokens, then one needle token per (key, value) pair, then one query per key.
NUM_NOISE, NUM_KEYS, NUM_VALUES = 16, 16, 16
NEEDLE_BASE = NUM_NOISE
QUERY_BASE = NEEDLE_BASE + NUM_KEYS * NUM_VALUES
VOCAB = QUERY_BASE + NUM_KEYS

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 16
# NSA's configuration scaled to the task: compression windows of 32 tokens every 16 (overlapping),
# selection blocks of 32, 6 selected (the first block and the own block forced), a 32-token window.
COMPRESS_BLOCK, COMPRESS_STRIDE = 32, 16    # compress_block_size, compress_stride
BLOCK, COUNT, LOCAL, WINDOW = 32, 6, 1, 32  # select_block_size, select_block_count, select_local_blocks, window_size
TOKENS, SEQUENCES = 1024, 3                 # per step: 3 packed sequences of random lengths
MIN_SEQ_LEN = 256
QUERIES = 16                                # query tokens closing each sequence
NEEDLE_SPAN = 96                            # the needles lie within this many tokens
NEEDLE_GAP = WINDOW                         # ... at least this far before the first query
LEARNING_RATE = 3e-3


class RecallModel(nn.Cell):
    """Factored token embedding -> NativeSparseAttention (residual) -> logits over the NUM_VALUES values.

    A token's embedding is the sum of its own row and the rows of the key and the value it names
    (needles name both, queries a key, noise neither): a needle and the query for its key share the
    key's row, so one layer can learn to match them."""

    def __init__(self, branches=ms_nsa.nsa_layer.BRANCHES, seed=0):
        super().__init__()
        ms.set_seed(seed)
        rng = np.random.default_rng(seed)

        def table(rows, cols, scale):
            return Tensor((rng.standard_normal((rows, cols)) * scale).astype(np.float32))

        # Own rows start at zero for needles and queries: their keys and values start out as pure
        # key / value rows, which is what has to be matched and read.
        own_rows = table(VOCAB, HIDDEN, 1.0).asnumpy()
        own_rows[NEEDLE_BASE:] = 0.0
        self.token_embedding = Parameter(Tensor(own_rows), name="token_embedding")
        # Row NUM_KEYS / NUM_VALUES is "names no key / value".
        self.key_embedding = Parameter(table(NUM_KEYS + 1, HIDDEN, 1.0), name="key_embedding")
        self.value_embedding = Parameter(table(NUM_VALUES + 1, HIDDEN, 1.0), name="value_embedding")
        key_of, value_of = token_fields()
        self.key_of, self.value_of = Tensor(key_of), Tensor(value_of)
        self.attention = ms_nsa.nn.NativeSparseAttention(
            HIDDEN, HEADS, KV_HEADS, HEAD_DIM, compress_block_size=COMPRESS_BLOCK, compress_stride=COMPRESS_STRIDE,
            select_block_size=BLOCK, select_block_count=COUNT, select_local_blocks=LOCAL, window_size=WINDOW,
            branches=branches, init_std=0.02)
        self.head = Parameter(table(HIDDEN, NUM_VALUES, HIDDEN ** -0.5), name="head")
        self.norm = nn.LayerNorm((HIDDEN,))

    def construct(self, tokens, actual_seq_len):
        x = self.norm(ops.gather(self.token_embedding, tokens, 0)
                      + ops.gather(self.key_embedding, ops.gather(self.key_of, tokens, 0), 0)
                      + ops.gather(self.value_embedding, ops.gather(self.value_of, tokens, 0), 0))
        return ops.matmul(x + self.attention(x, actual_seq_len), self.head)


def token_fields():
    """The key and the value each token id names (NUM_KEYS / NUM_VALUES for none), int32 [VOCAB]."""
    key_of = np.full(VOCAB, NUM_KEYS, np.int32)
    value_of = np.full(VOCAB, NUM_VALUES, np.int32)
    needles = np.arange(NUM_KEYS * NUM_VALUES)
    key_of[NEEDLE_BASE + needles] = needles // NUM_VALUES
    value_of[NEEDLE_BASE + needles] = needles % NUM_VALUES
    key_of[QUERY_BASE:QUERY_BASE + NUM_KEYS] = np.arange(NUM_KEYS)
    return key_of, value_of


class RecallLoss(nn.Cell):
    """Cross-entropy at the query tokens only (weight 1 there, 0 elsewhere), averaged over them."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, tokens, actual_seq_len, targets, weights):
        logits = self.model(tokens, actual_seq_len)
        log_probs = ops.log_softmax(logits, axis=-1)
        picked = ops.gather_elements(log_probs, 1, targets.reshape(-1, 1)).reshape(-1)
        return -(picked * weights).sum() / weights.sum()


def random_lengths(rng, total, parts, unit, minimum):
    """`parts` random lengths, multiples of `unit`, each >= `minimum`, summing to `total`."""
    spare = (total - parts * minimum) // unit
    cuts = np.sort(rng.integers(0, spare + 1, parts - 1))
    return (np.diff(np.concatenate([[0], cuts, [spare]])) * unit + minimum).astype(np.int64)


def recall_sequence(rng, length):
    """One sequence: tokens, targets (the value asked at each query, 0 elsewhere), query mask."""
    tokens = rng.integers(0, NUM_NOISE, length)
    values = rng.integers(0, NUM_VALUES, NUM_KEYS)
    # The needles' stretch ends before the first query's window begins: no window sees a needle.
    latest_start = length - QUERIES - NEEDLE_GAP - NEEDLE_SPAN
    span_start = rng.integers(0, latest_start + 1)
    positions = span_start + rng.choice(NEEDLE_SPAN, NUM_KEYS, replace=False)
    tokens[positions] = NEEDLE_BASE + np.arange(NUM_KEYS) * NUM_VALUES + values
    asked = rng.integers(0, NUM_KEYS, QUERIES)
    tokens[length - QUERIES:] = QUERY_BASE + asked
    targets = np.zeros(length, np.int32)
    targets[length - QUERIES:] = values[asked]
    is_query = np.zeros(length, np.float32)
    is_query[length - QUERIES:] = 1.0
    return tokens, targets, is_query


def recall_arrays(rng, tokens=TOKENS, sequences=SEQUENCES):
    """A packed batch as NumPy arrays: token ids [T] int32, per-sequence lengths [B] int64 (multiples
    of BLOCK, the op's contract), targets [T] int32, query weights [T] float32."""
    lengths = random_lengths(rng, tokens, sequences, BLOCK, MIN_SEQ_LEN)
    parts = [recall_sequence(rng, int(n)) for n in lengths]
    token_ids, targets, weights = (np.concatenate(column) for column in zip(*parts))
    return token_ids.astype(np.int32), lengths, targets, weights


def as_batch(token_ids, lengths, targets, weights):
    """The model's inputs: (tokens, cumulative lengths, targets, weights) Tensors."""
    return Tensor(token_ids), Tensor(np.cumsum(lengths).astype(np.int64)), Tensor(targets), Tensor(weights)


def recall_batch(rng, tokens=TOKENS, sequences=SEQUENCES):
    return as_batch(*recall_arrays(rng, tokens, sequences))


def accuracy(model, batches):
    """Fraction of query tokens whose most likely value is the right one."""
    hits = total = 0
    for token_ids, cu_seq_len, targets, weights in batches:
        predicted = model(token_ids, cu_seq_len).asnumpy().argmax(axis=-1)
        at_query = weights.asnumpy() > 0
        hits += int((predicted[at_query] == targets.asnumpy()[at_query]).sum())
        total += int(at_query.sum())
    return hits / total


def progress(label, step, steps, loss, acc, started, width=28):
    done = int(width * step / steps)
    rate = step / max(time.time() - started, 1e-9)
    sys.stdout.write(f"\r  {label:12s} [{'#' * done}{'-' * (width - done)}] {step:4d}/{steps}  loss {loss:6.3f}  "
                     f"held-out acc {acc:6.1%}  {rate:5.1f} steps/s")
    sys.stdout.flush()


def train(label, branches, steps, seed, eval_every=25):
    """Trains a RecallModel in GRAPH_MODE; returns its loss per step and (step, accuracy) points."""
    model = RecallModel(branches, seed)
    # mint.optim.Adam, not nn.Adam: MindSpore 2.10's nn.Adam builds the deprecated FusedSparseAdam
    # primitive (for sparse gradients, which this model has none of) and prints a deprecation warning.
    optimizer = mint.optim.Adam(model.trainable_params(), lr=LEARNING_RATE)
    train_step = nn.TrainOneStepCell(RecallLoss(model), optimizer)
    train_step.set_train()
    data_rng, held_out = np.random.default_rng(seed + 1), np.random.default_rng(seed + 2)
    held_out_batches = [recall_batch(held_out) for _ in range(4)]
    losses, curve = [], [(0, accuracy(model, held_out_batches))]
    started = time.time()
    for step in range(1, steps + 1):
        losses.append(float(train_step(*recall_batch(data_rng)).asnumpy()))
        if step % eval_every == 0 or step == steps:
            curve.append((step, accuracy(model, held_out_batches)))
        progress(label, step, steps, np.mean(losses[-10:]), curve[-1][1], started)
    print(f"  ({time.time() - started:.0f} s)")
    return losses, curve


def have_matplotlib():
    try:
        import matplotlib  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        return False
    return True


def save_plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for label, (losses, curve) in results.items():
        width = min(10, len(losses))            # a 10-step mean, or all steps of a shorter run
        smooth = np.convolve(losses, np.ones(width) / width, mode="valid")
        loss_ax.plot(np.arange(width, len(losses) + 1), smooth, label=label)
        acc_ax.plot(*zip(*curve), marker="o", markersize=3, label=label)
    acc_ax.axhline(1 / NUM_VALUES, color="gray", linestyle=":", label="chance")
    loss_ax.set(xlabel="step", ylabel="training loss (10-step mean)", title="Loss")
    acc_ax.set(xlabel="step", ylabel="held-out recall accuracy", title="Accuracy at the query tokens", ylim=(0, 1))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Multi-key recall, needles > {WINDOW} tokens back: NSA vs sliding window only")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_against_reference(seed):
    """The op (forward and backward, both sparse modes, all dtypes) vs the float64 reference."""
    print("Checking ms_nsa against the float64 reference (relative error, tolerance):")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    rng = np.random.default_rng(seed)
    q_lens, kv_lens = (37, 18, 73), (256, 192, 320)
    cu_q, cu_kv = tuple(np.cumsum(q_lens).tolist()), tuple(np.cumsum(kv_lens).tolist())
    t1, t2, n1, n2, dim, v_dim, block, count = sum(q_lens), sum(kv_lens), 8, 2, 192, 128, 64, 3
    scale = dim ** -0.5
    topk = np.concatenate([rng.integers(0, kv // block, (q, n2, count)) for q, kv in zip(q_lens, kv_lens)])
    topk = topk.astype(np.int32)
    tolerance = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}
    ok = True
    for dtype_name, dtype in (("float32", ms.float32), ("float16", ms.float16), ("bfloat16", ms.bfloat16)):
        for sparse_mode in (0, 2):
            q, k, v, d_out = (Tensor(rng.standard_normal(s).astype(np.float32)).astype(dtype)
                              for s in ((t1, n1, dim), (t2, n2, dim), (t2, n2, v_dim), (t1, n1, v_dim)))
            args = (scale, n1, block, count)
            kw = dict(actual_seq_qlen=cu_q, actual_seq_kvlen=cu_kv, sparse_mode=sparse_mode)
            out, m, l = ms_nsa.nsa_select_attention(q, k, v, Tensor(topk), *args, **kw)
            grads = ms_nsa.nsa_select_attention_grad(d_out, q, k, v, out, m, l, Tensor(topk), *args, **kw)
            ref_out, _, _ = ms_nsa.reference.forward(q, k, v, topk, *args, **kw)
            ref_grads = ms_nsa.reference.backward(d_out, q, k, v, out, m, l, topk, *args, **kw)
            errors = [_rel(out, ref_out)] + [_rel(g, r) for g, r in zip(grads, ref_grads)]
            passed = errors[0] < tolerance[dtype_name] and max(errors[1:]) < 2 * tolerance[dtype_name]
            ok &= passed
            print(f"  {dtype_name:8s} sparse_mode={sparse_mode}: out {errors[0]:.2e}  dq {errors[1]:.2e}  "
                  f"dk {errors[2]:.2e}  dv {errors[3]:.2e}  (tol {tolerance[dtype_name]:.0e} / "
                  f"{2 * tolerance[dtype_name]:.0e})  {'PASS' if passed else 'FAIL'}")
    return ok


def _rel(tensor, ref):
    got = tensor.astype(ms.float32).asnumpy().astype(np.float64)
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join("out", "demo"), help="folder for the plot")
    parser.add_argument("--ablation", action="store_true",
                        help="also train compressed + window without the selected branch")
    args = parser.parse_args(argv)
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    print(f"Multi-key recall: {NUM_KEYS} key->value needles within {NEEDLE_SPAN} tokens, > {WINDOW} tokens "
          f"before {QUERIES} queries; {SEQUENCES} packed sequences of >= {MIN_SEQ_LEN} tokens, T = {TOKENS}.\n"
          f"NativeSparseAttention(hidden {HIDDEN}, N1={HEADS}, N2={KV_HEADS}, D={HEAD_DIM}, compress_block_size="
          f"{COMPRESS_BLOCK}, compress_stride={COMPRESS_STRIDE}, select_block_size={BLOCK}, "
          f"select_block_count={COUNT}, "
          f"select_local_blocks={LOCAL}, window_size={WINDOW}), GRAPH_MODE, "
          f"{args.steps} steps of Adam; chance = {1 / NUM_VALUES:.1%}")
    plot = have_matplotlib()
    if not plot:
        print("Note: matplotlib is not installed, so the demo will not draw its plot; everything else runs. "
              "Install it with `pip install matplotlib` (or install ms_nsa with `pip install .[demo]`).")
    started = time.time()
    results = {"NSA (3 branches)": train("NSA", ms_nsa.nsa_layer.BRANCHES, args.steps, args.seed),
               "window only": train("window only", ("window",), args.steps, args.seed)}
    if args.ablation:
        results["compressed + window"] = train("no selection", ("compressed", "window"), args.steps, args.seed)
    if plot:
        os.makedirs(args.out, exist_ok=True)
        plot_path = os.path.join(args.out, "nsa_vs_window.png")
        save_plot(results, plot_path)
        plot_note = f"Plot: {plot_path}"
    else:
        plot_note = "No plot (matplotlib is not installed)."
    final = {label: curve[-1][1] for label, (_, curve) in results.items()}
    nsa_acc, window_acc = final["NSA (3 branches)"], final["window only"]
    print(f"Held-out recall accuracy after {args.steps} steps: "
          + ", ".join(f"{label} {acc:.1%}" for label, acc in final.items())
          + f" (chance {1 / NUM_VALUES:.1%}); training took {time.time() - started:.0f} s. {plot_note}")

    op_ok = check_against_reference(args.seed)
    nsa_wins = nsa_acc > window_acc
    print(f"Result: {'OK' if op_ok and nsa_wins else 'FAILED'} (NSA {'beats' if nsa_wins else 'does NOT beat'} "
          f"the window-only baseline: {nsa_acc:.1%} vs {window_acc:.1%}; op check {'passed' if op_ok else 'FAILED'})")
    return 0 if op_ok and nsa_wins else 1


if __name__ == "__main__":
    sys.exit(main())
