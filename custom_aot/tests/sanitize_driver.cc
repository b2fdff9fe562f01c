// Standalone driver for the CPU kernels under AddressSanitizer and UndefinedBehaviorSanitizer.
//
// No MindSpore: it calls the AOT entry points (nsa_aot.cc) exactly as MindSpore does (params, ndims,
// shapes, dtype strings, an AotExtra carrying the attributes), on tensors allocated to their exact
// size so that any read or write past an end is caught. It runs valid problems (all dtypes, both
// sparse modes, varlen, GQA, duplicates, forward and backward) and invalid ones (every
// data-dependent error, inconsistent shapes, random corruptions), and checks each returns the
// expected status. Exit code 0 only if every case behaved; the sanitizers abort on any memory or UB
// error. Built and run by tests/test_sanitizers.py.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "../nsa_core.h"
#include "driver_common.h"

extern "C" {
int NsaSelectAttentionInit(int *, int64_t **, const char **, mindspore::AotExtra *);
int NsaSelectAttention(int, void **, int *, int64_t **, const char **, void *, void *);
int NsaSelectAttentionGradInit(int *, int64_t **, const char **, mindspore::AotExtra *);
int NsaSelectAttentionGrad(int, void **, int *, int64_t **, const char **, void *, void *);
}

namespace {

using driver::Buffer;
using driver::expect;
using driver::failures;
using driver::fill_random;
using driver::invalid_runs;
using driver::rng;
using driver::valid_runs;
using driver::all_finite;

struct Problem {
  std::vector<int64_t> q_lens, kv_lens;
  int64_t q_heads = 4, kv_heads = 2, dim = 32, v_dim = 16, block = 16, count = 2;
  int64_t sparse_mode = 0;
  std::string dtype = "float32";
  bool duplicates = false;
};

struct Inputs {
  Buffer q, k, v, topk, cu_q, cu_kv;
  explicit Inputs(const Problem &p)
      : q({total(p.q_lens), p.q_heads, p.dim}, p.dtype), k({total(p.kv_lens), p.kv_heads, p.dim}, p.dtype),
        v({total(p.kv_lens), p.kv_heads, p.v_dim}, p.dtype),
        topk({total(p.q_lens), p.kv_heads, p.count}, "int32"),
        cu_q({static_cast<int64_t>(p.q_lens.size())}, "int64"),
        cu_kv({static_cast<int64_t>(p.kv_lens.size())}, "int64") {
    fill_random(q);
    fill_random(k);
    fill_random(v);
    int64_t acc_q = 0, acc_kv = 0, row = 0;
    for (size_t b = 0; b < p.q_lens.size(); ++b) {
      acc_q += p.q_lens[b];
      acc_kv += p.kv_lens[b];
      cu_q.as<int64_t>()[b] = acc_q;
      cu_kv.as<int64_t>()[b] = acc_kv;
      const int64_t blocks = p.kv_lens[b] / p.block;
      for (int64_t s = 0; s < p.q_lens[b]; ++s, ++row) {
        for (int64_t j = 0; j < p.kv_heads * p.count; ++j) {
          const int64_t pick = p.duplicates ? static_cast<int64_t>(rng() % blocks) : (j % p.count) % blocks;
          topk.as<int32_t>()[row * p.kv_heads * p.count + j] = static_cast<int32_t>(pick);
        }
      }
    }
  }
  static int64_t total(const std::vector<int64_t> &lens) {
    int64_t t = 0;
    for (int64_t v : lens) t += v;
    return t;
  }
};

int launch(const char *entry, driver::InitFn init, driver::KernelFn kernel, std::vector<Buffer *> tensors, const Problem &p,
           int64_t head_num_override = -1) {
  return driver::call_entry(entry, init, kernel, tensors,
                            {{"head_num", head_num_override >= 0 ? head_num_override : p.q_heads},
                             {"sparse_mode", p.sparse_mode}, {"select_block_size", p.block},
                             {"select_block_count", p.count}});
}

struct Outputs {
  Buffer softmax_max, softmax_sum, out, d_out, dq, dk, dv;
  Outputs(const Problem &p, const Inputs &in)
      : softmax_max({in.q.shape[0], p.q_heads, 8}, "float32"), softmax_sum({in.q.shape[0], p.q_heads, 8}, "float32"),
        out({in.q.shape[0], p.q_heads, p.v_dim}, p.dtype), d_out({in.q.shape[0], p.q_heads, p.v_dim}, p.dtype),
        dq(in.q.shape, p.dtype), dk(in.k.shape, p.dtype), dv(in.v.shape, p.dtype) {
    fill_random(d_out);
  }
};

int forward(Inputs &in, Outputs &o, const Problem &p, int64_t head_num = -1) {
  return launch("NsaSelectAttention", NsaSelectAttentionInit, NsaSelectAttention,
                {&in.q, &in.k, &in.v, &in.topk, &in.cu_q, &in.cu_kv, &o.softmax_max, &o.softmax_sum, &o.out}, p,
                head_num);
}

int backward(Inputs &in, Outputs &o, const Problem &p) {
  return launch("NsaSelectAttentionGrad", NsaSelectAttentionGradInit, NsaSelectAttentionGrad,
                {&in.q, &in.k, &in.v, &o.out, &o.d_out, &o.softmax_max, &o.softmax_sum, &in.topk, &in.cu_q,
                 &in.cu_kv, &o.dq, &o.dk, &o.dv}, p);
}

void run_valid(const Problem &p, const std::string &name) {
  Inputs in(p);
  Outputs o(p, in);
  expect(forward(in, o, p) == 0, name + ": forward failed");
  expect(backward(in, o, p) == 0, name + ": backward failed");
  expect(all_finite(o.out) && all_finite(o.dq) && all_finite(o.dk) && all_finite(o.dv),
         name + ": non-finite output from finite inputs");
  ++valid_runs;
}

void run_invalid(Problem p, const std::string &name, int want, void (*corrupt)(Inputs &, Problem &),
                 int64_t head_num = -1) {
  Inputs in(p);
  corrupt(in, p);
  Outputs o(p, in);
  const int got_forward = forward(in, o, p, head_num);
  expect(got_forward == want, name + ": forward returned " + std::to_string(got_forward) + ", want " +
                                  std::to_string(want));
  if (head_num < 0) {
    const int got_backward = backward(in, o, p);
    expect(got_backward == want, name + ": backward returned " + std::to_string(got_backward));
  }
  ++invalid_runs;
}

}  // namespace

int main() {
  using ms_nsa::kBadCumulativeLength;
  using ms_nsa::kBadKvLength;
  using ms_nsa::kBadProblem;
  using ms_nsa::kIndexOutOfRange;
  using ms_nsa::kUnsupportedDType;

  for (const char *dtype : {"float32", "float16", "bfloat16"}) {
    for (int64_t mode : {0, 2}) {
      Problem p;
      p.q_lens = {3, 0, 7, 1};
      p.kv_lens = {64, 32, 48, 32};
      p.dtype = dtype;
      p.sparse_mode = mode;
      run_valid(p, std::string("varlen ") + dtype);
      p.duplicates = true;
      p.count = 4;
      p.kv_lens = {64, 64, 96, 64};  // every batch with queries needs count * block keys
      run_valid(p, std::string("duplicates ") + dtype);
      Problem wide;
      wide.q_lens = {5};
      wide.kv_lens = {256};
      wide.q_heads = 32;
      wide.kv_heads = 1;
      wide.dim = 192;
      wide.v_dim = 128;
      wide.block = 64;
      wide.count = 3;
      wide.dtype = dtype;
      wide.sparse_mode = mode;
      run_valid(wide, std::string("G=32 D=192 ") + dtype);
    }
  }

  Problem base;
  base.q_lens = {3, 4};
  base.kv_lens = {48, 32};
  run_invalid(base, "index == limit", kIndexOutOfRange, [](Inputs &in, Problem &) { in.topk.as<int32_t>()[5] = 3; });
  run_invalid(base, "index in next batch's range", kIndexOutOfRange,
              [](Inputs &in, Problem &p) { in.topk.as<int32_t>()[3 * p.kv_heads * p.count] = 2; });
  run_invalid(base, "index -1", kIndexOutOfRange, [](Inputs &in, Problem &) { in.topk.as<int32_t>()[0] = -1; });
  run_invalid(base, "index INT32_MAX", kIndexOutOfRange,
              [](Inputs &in, Problem &) { in.topk.as<int32_t>()[1] = INT32_MAX; });
  run_invalid(base, "index INT32_MIN", kIndexOutOfRange,
              [](Inputs &in, Problem &) { in.topk.as<int32_t>()[2] = INT32_MIN; });
  run_invalid(base, "cu_q decreasing", kBadCumulativeLength,
              [](Inputs &in, Problem &) { in.cu_q.as<int64_t>()[0] = 9; });
  run_invalid(base, "cu_q short of T1", kBadCumulativeLength,
              [](Inputs &in, Problem &) { in.cu_q.as<int64_t>()[1] = 6; });
  run_invalid(base, "cu_kv negative", kBadCumulativeLength,
              [](Inputs &in, Problem &) { in.cu_kv.as<int64_t>()[0] = -16; });
  run_invalid(base, "cu_kv huge", kBadCumulativeLength,
              [](Inputs &in, Problem &) { in.cu_kv.as<int64_t>()[0] = INT64_MAX; });
  run_invalid(base, "kv length not a multiple of block", kBadKvLength, [](Inputs &in, Problem &) {
    in.cu_kv.as<int64_t>()[0] = 40;
  });
  run_invalid(base, "kv length below block * count", kBadKvLength, [](Inputs &in, Problem &) {
    in.cu_kv.as<int64_t>()[0] = 16;
  });
  run_invalid(base, "head_num != N1", kBadProblem, [](Inputs &, Problem &) {}, /*head_num=*/3);
  run_invalid(base, "topk last dim != count", kBadProblem, [](Inputs &in, Problem &) { in.topk.shape[2] = 1; });
  run_invalid(base, "cu lengths of different B", kBadProblem, [](Inputs &in, Problem &) { in.cu_kv.shape[0] = 1; });
  run_invalid(base, "no batches", kBadProblem, [](Inputs &in, Problem &) {
    in.cu_q.shape[0] = 0;
    in.cu_kv.shape[0] = 0;
  });
  run_invalid(base, "float64 query", kUnsupportedDType, [](Inputs &in, Problem &) { in.q.dtype = "float64"; });
  run_invalid(base, "int64 topk", kBadProblem, [](Inputs &in, Problem &) { in.topk.dtype = "int64"; });
  run_invalid(base, "N1 not a multiple of N2", kBadProblem, [](Inputs &in, Problem &p) {
    in.q.shape[1] = 3;
    p.q_heads = 3;
  });

  // Random corruptions of a valid problem: one topk entry or one cumulative length set to a random
  // int; each must either run cleanly (still valid) or return the matching status.
  std::uniform_int_distribution<int64_t> wide(-100, 100);
  int random_cases = 0;
  for (int trial = 0; trial < 300; ++trial) {
    Problem p = base;
    p.sparse_mode = trial % 2 == 0 ? 0 : 2;
    Inputs in(p);
    const bool hit_index = trial % 3 != 0;
    int64_t value = wide(rng);
    if (hit_index) {
      in.topk.as<int32_t>()[rng() % in.topk.count()] = static_cast<int32_t>(value);
    } else {
      in.cu_kv.as<int64_t>()[rng() % 2] = value;
    }
    Outputs o(p, in);
    const int status = forward(in, o, p);
    const bool acceptable = status == 0 || status == kIndexOutOfRange || status == kBadCumulativeLength ||
                            status == kBadKvLength;
    expect(acceptable, "random corruption returned " + std::to_string(status));
    if (status == 0) expect(backward(in, o, p) == 0, "random corruption: forward ok but backward not");
    ++random_cases;
  }

  std::printf("sanitize_driver: %d valid problems, %d invalid problems, %d random corruptions, %d failures\n",
              valid_runs, invalid_runs, random_cases, failures);
  return failures == 0 ? 0 : 1;
}
