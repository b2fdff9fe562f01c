"""Data-parallel training of an NSA model with MindSpore's own distributed engine (msrun).

Every rank trains the demo's recall model (ms_nsa.demo.RecallModel: NativeSparseAttention, whose
selected branch is ms_nsa's op) in GRAPH_MODE on its own packed varlen batch; DistributedGradReducer
averages the gradients over the ranks (an all-reduce) before each optimizer step, so all ranks keep
identical parameters. Each rank's loss is the mean over the same number of query tokens, so the
averaged gradient is exactly the gradient of the mean loss over all ranks' batches packed together:
`--single` runs that single-process equivalent, for comparison.

    # 2 workers on this machine's CPU (MindSpore's CPU collectives); the venv's python first on PATH:
    PATH=$PWD/.venv/bin:$PATH msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --join=True \\
        --log_dir=out/train_dp/logs examples/train_dp.py --steps 20 --out out/train_dp
    # the same training in one process, on the two ranks' batches packed into one:
    .venv/bin/python examples/train_dp.py --single --world-size 2 --steps 20 --out out/train_dp

Each process writes its final parameters and losses to <out>/params_rank<r>.npz (or
params_single.npz). On an Ascend cluster the script is the same with --device Ascend and msrun's
multi-node flags (docs/training.md).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import mindspore as ms
from mindspore import nn, ops
from mindspore.communication import get_group_size, get_rank, init
from mindspore.context import ParallelMode
from mindspore.nn.wrap.grad_reducer import DistributedGradReducer

from ms_nsa.demo import LEARNING_RATE, RecallLoss, RecallModel, as_batch, recall_arrays

TOKENS_PER_RANK, SEQUENCES_PER_RANK = 640, 2


class TrainStep(nn.Cell):
    """Loss, gradients (all-reduced and averaged over the ranks when data parallel), optimizer step."""

    def __init__(self, loss_cell, optimizer, data_parallel):
        super().__init__(auto_prefix=False)
        self.loss_cell = loss_cell
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.grad = ops.GradOperation(get_by_list=True)
        self.data_parallel = data_parallel
        if data_parallel:
            self.grad_reducer = DistributedGradReducer(self.weights, mean=True)

    def construct(self, *inputs):
        loss = self.loss_cell(*inputs)
        grads = self.grad(self.loss_cell, self.weights)(*inputs)
        if self.data_parallel:
            grads = self.grad_reducer(grads)
        self.optimizer(grads)
        return loss


def step_batches(seed, step, world_size):
    """Every rank's batch of this step, as NumPy arrays; the same on every process."""
    rng = np.random.default_rng([seed, step])
    return [recall_arrays(rng, TOKENS_PER_RANK, SEQUENCES_PER_RANK) for _ in range(world_size)]


def packed(batches):
    """Several packed batches as one: tokens, lengths, targets and weights concatenated."""
    return tuple(np.concatenate(column) for column in zip(*batches))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join("out", "train_dp"))
    parser.add_argument("--device", default="CPU", help="CPU, or Ascend on an NPU cluster")
    parser.add_argument("--single", action="store_true",
                        help="no msrun: one process trains on all ranks' batches packed together")
    parser.add_argument("--world-size", type=int, default=2, help="with --single: how many ranks to emulate")
    args = parser.parse_args(argv)

    ms.set_context(mode=ms.GRAPH_MODE)
    if args.device == "CPU":
        ms.set_device("CPU")
    else:
        ms.set_device(args.device, int(os.environ.get("DEVICE_ID", "0")))   # msrun sets DEVICE_ID per worker
    if args.single:
        rank, world_size, tag = 0, args.world_size, "single"
    else:
        init()
        rank, world_size = get_rank(), get_group_size()
        tag = f"rank{rank}"
        ms.set_auto_parallel_context(parallel_mode=ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                     device_num=world_size)

    model = RecallModel(seed=args.seed)          # same seed on every rank: identical initial parameters
    train_step = TrainStep(RecallLoss(model), nn.Adam(model.trainable_params(), learning_rate=LEARNING_RATE),
                           data_parallel=not args.single)
    train_step.set_train()
    losses = []
    for step in range(args.steps):
        batches = step_batches(args.seed, step, world_size)
        batch = packed(batches) if args.single else batches[rank]
        losses.append(float(train_step(*as_batch(*batch)).asnumpy()))
        print(f"[{tag}] step {step + 1}/{args.steps} loss {losses[-1]:.5f}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"params_{tag}.npz")
    np.savez(path, losses=np.array(losses), **{p.name: p.asnumpy() for p in model.trainable_params()})
    print(f"[{tag}] saved {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
