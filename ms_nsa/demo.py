"""Demo: train a small retrieval model built on NsaSelectAttention in GRAPH_MODE, then check the op.

The task needs the selected blocks: every sequence hides, in one of its KV tokens, a code and a
payload. Each query carries a noisy copy of one code and must output the matching payload. The
selection (as NSA's compressed branch would supply it) names the block holding the answer among
distractor blocks, so the model has to learn query/key projections that find the token inside the
selected blocks and a value path that carries its payload out. Batches are packed varlen TND with
new lengths every step (passed as Tensors: no recompilation).

    python -m ms_nsa.demo [--steps 300] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

import ms_nsa

CODE_DIM, PAYLOAD_DIM = 16, 8
MODEL_DIM = CODE_DIM + PAYLOAD_DIM
HEAD_NUM, KV_HEADS, HEAD_DIM = 4, 2, 32
BLOCK, COUNT = 16, 4                 # select_block_size, select_block_count
BATCHES, Q_TOKENS, KV_TOKENS = 4, 64, 1024


class RetrievalModel(nn.Cell):
    def __init__(self, seed):
        super().__init__()
        rng = np.random.default_rng(seed)

        def weight(rows, cols):
            return ms.Parameter(Tensor(rng.standard_normal((rows, cols)) / np.sqrt(rows), ms.float32))

        self.w_q = weight(MODEL_DIM, HEAD_NUM * HEAD_DIM)
        self.w_k = weight(MODEL_DIM, KV_HEADS * HEAD_DIM)
        self.w_v = weight(MODEL_DIM, KV_HEADS * HEAD_DIM)
        self.w_o = weight(HEAD_NUM * HEAD_DIM, PAYLOAD_DIM)
        self.attention = ms_nsa.nn.NsaSelectAttention(HEAD_NUM, BLOCK, COUNT, sparse_mode=0)

    def construct(self, x_q, x_kv, topk_indices, actual_seq_qlen, actual_seq_kvlen):
        q = ops.matmul(x_q, self.w_q).reshape(Q_TOKENS, HEAD_NUM, HEAD_DIM)
        k = ops.matmul(x_kv, self.w_k).reshape(KV_TOKENS, KV_HEADS, HEAD_DIM)
        v = ops.matmul(x_kv, self.w_v).reshape(KV_TOKENS, KV_HEADS, HEAD_DIM)
        out = self.attention(q, k, v, topk_indices, actual_seq_qlen, actual_seq_kvlen)
        return ops.matmul(out.reshape(Q_TOKENS, HEAD_NUM * HEAD_DIM), self.w_o)


class Loss(nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, x_q, x_kv, topk_indices, actual_seq_qlen, actual_seq_kvlen, target):
        pred = self.model(x_q, x_kv, topk_indices, actual_seq_qlen, actual_seq_kvlen)
        return ((pred - target) ** 2).mean()


def split(total, parts, rng, unit=1, minimum=1):
    """`parts` random positive lengths, multiples of `unit`, at least `minimum`, summing to `total`."""
    free = total // unit - parts * minimum
    cuts = np.sort(rng.integers(0, free + 1, parts - 1))
    return (np.diff(np.concatenate([[0], cuts, [free]])) + minimum) * unit


def make_batch(rng):
    """A packed varlen batch: inputs, selection, cumulative lengths, targets and the answer rows."""
    q_lens = split(Q_TOKENS, BATCHES, rng, minimum=4)
    kv_lens = split(KV_TOKENS, BATCHES, rng, unit=BLOCK, minimum=2 * COUNT)
    x_kv = np.zeros((KV_TOKENS, MODEL_DIM), np.float32)
    x_kv[:, :CODE_DIM] = rng.choice([-1.0, 1.0], (KV_TOKENS, CODE_DIM))
    x_kv[:, CODE_DIM:] = rng.standard_normal((KV_TOKENS, PAYLOAD_DIM))
    x_q = np.zeros((Q_TOKENS, MODEL_DIM), np.float32)
    target = np.zeros((Q_TOKENS, PAYLOAD_DIM), np.float32)
    topk = np.zeros((Q_TOKENS, KV_HEADS, COUNT), np.int32)
    answer = np.zeros(Q_TOKENS, np.int64)
    q0 = k0 = 0
    for q_len, kv_len in zip(q_lens, kv_lens):
        blocks = kv_len // BLOCK
        for t in range(q0, q0 + q_len):
            chosen = rng.permutation(blocks)[:COUNT]
            row = k0 + chosen[rng.integers(COUNT)] * BLOCK + rng.integers(BLOCK)
            x_q[t, :CODE_DIM] = x_kv[row, :CODE_DIM] + 0.3 * rng.standard_normal(CODE_DIM)
            target[t] = x_kv[row, CODE_DIM:]
            topk[t, :] = chosen  # both KV heads share the selection here
            answer[t] = row
        q0, k0 = q0 + q_len, k0 + kv_len
    lengths = (Tensor(np.cumsum(q_lens).astype(np.int64)), Tensor(np.cumsum(kv_lens).astype(np.int64)))
    return (Tensor(x_q), Tensor(x_kv), Tensor(topk)) + lengths + (Tensor(target),), (x_kv, topk, answer)


def retrieval_accuracy(pred, x_kv, topk, answer, kv_begins):
    """Fraction of queries whose output is nearest to the right payload among all selected tokens."""
    hits = 0
    for t in range(len(answer)):
        rows = (kv_begins[t] + topk[t, 0][:, None] * BLOCK + np.arange(BLOCK)).reshape(-1)
        dist = ((x_kv[rows, CODE_DIM:] - pred[t]) ** 2).sum(axis=1)
        hits += rows[np.argmin(dist)] == answer[t]
    return hits / len(answer)


def progress(step, steps, loss, started, width=30):
    done = int(width * step / steps)
    bar = "#" * done + "-" * (width - done)
    rate = step / max(time.time() - started, 1e-9)
    sys.stdout.write(f"\r  [{bar}] {step:4d}/{steps}  loss {loss:.4f}  {rate:5.1f} steps/s")
    sys.stdout.flush()


def train(steps, seed):
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(seed)
    model = RetrievalModel(seed)
    loss_cell = Loss(model)
    optimizer = nn.Adam(model.trainable_params(), learning_rate=3e-3)
    train_step = nn.TrainOneStepCell(loss_cell, optimizer)
    train_step.set_train()

    print(f"Training RetrievalModel (N1={HEAD_NUM}, N2={KV_HEADS}, D={HEAD_DIM}, select_block_size={BLOCK}, "
          f"select_block_count={COUNT}; {BATCHES} packed sequences, T1={Q_TOKENS}, T2={KV_TOKENS}) "
          f"in GRAPH_MODE for {steps} steps")
    started, losses = time.time(), []
    for step in range(1, steps + 1):
        inputs, _ = make_batch(rng)
        losses.append(float(train_step(*inputs).asnumpy()))
        if step == 1 or step % 5 == 0 or step == steps:
            progress(step, steps, np.mean(losses[-10:]), started)
    print()

    # Held-out batches: loss and retrieval accuracy.
    eval_losses, accuracies = [], []
    for _ in range(5):
        inputs, (x_kv, topk, answer) = make_batch(rng)
        pred = model(*inputs[:5]).asnumpy()
        eval_losses.append(float(((pred - inputs[5].asnumpy()) ** 2).mean()))
        cu_q, cu_kv = inputs[3].asnumpy(), inputs[4].asnumpy()
        kv_begins = np.repeat(np.concatenate([[0], cu_kv[:-1]]), np.diff(np.concatenate([[0], cu_q])))
        accuracies.append(retrieval_accuracy(pred, x_kv, topk, answer, kv_begins))
    chance = 1.0 / (BLOCK * COUNT)
    print(f"  loss: first 10 steps {np.mean(losses[:10]):.4f} -> last 10 steps {np.mean(losses[-10:]):.4f} "
          f"(predicting zeros scores {1.0:.2f})")
    print(f"  held-out: loss {np.mean(eval_losses):.4f}, retrieval accuracy {np.mean(accuracies):.1%} "
          f"(chance {chance:.1%} among the {BLOCK * COUNT} selected tokens)")
    return losses, float(np.mean(accuracies))


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
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    ms.set_device("CPU")
    losses, accuracy = train(args.steps, args.seed)
    ok = check_against_reference(args.seed)
    learned = np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    print(f"Result: {'OK' if ok and learned else 'FAILED'} (final loss {np.mean(losses[-10:]):.4f}, "
          f"retrieval accuracy {accuracy:.1%}, op check {'passed' if ok else 'FAILED'})")
    return 0 if ok and learned else 1


if __name__ == "__main__":
    sys.exit(main())
