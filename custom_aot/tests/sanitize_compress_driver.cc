// Standalone ASan/UBSan driver for nsa_compress(_grad) and nsa_compress_attention(_grad): calls their
// AOT entry points as MindSpore does, on exactly-sized buffers, with valid problems (all dtypes, short
// segments, masks present and absent, GQA), every data-dependent error and random corruptions of the
// cumulative lengths. Exit code 0 only if every call returned the expected status. Built and run by
// tests/test_sanitizers.py.
#include <cstdint>
#include <string>
#include <vector>

#include "../nsa_status.h"
#include "driver_common.h"

extern "C" {
int NsaCompressInit(int *, int64_t **, const char **, mindspore::AotExtra *);
int NsaCompress(int, void **, int *, int64_t **, const char **, void *, void *);
int NsaCompressGradInit(int *, int64_t **, const char **, mindspore::AotExtra *);
int NsaCompressGrad(int, void **, int *, int64_t **, const char **, void *, void *);
int NsaCompressAttentionInit(int *, int64_t **, const char **, mindspore::AotExtra *);
int NsaCompressAttention(int, void **, int *, int64_t **, const char **, void *, void *);
int NsaCompressAttentionGradInit(int *, int64_t **, const char **, mindspore::AotExtra *);
int NsaCompressAttentionGrad(int, void **, int *, int64_t **, const char **, void *, void *);
}

namespace {

using driver::Buffer;
using driver::expect;
using driver::fill_random;

Buffer cumulative(const std::vector<int64_t> &lens) {
  Buffer cu({static_cast<int64_t>(lens.size())}, "int64");
  int64_t total = 0;
  for (size_t b = 0; b < lens.size(); ++b) cu.as<int64_t>()[b] = total += lens[b];
  return cu;
}

int64_t sum(const std::vector<int64_t> &lens) {
  int64_t total = 0;
  for (int64_t v : lens) total += v;
  return total;
}

// ---- nsa_compress ----------------------------------------------------------------------------------
struct Compress {
  std::vector<int64_t> lens{45, 7, 100};
  int64_t heads = 2, dim = 24, block = 32, stride = 16;
  std::string dtype = "float32";

  int64_t windows() const {
    int64_t total = 0;
    for (int64_t n : lens) total += n < block ? 0 : 1 + (n - block) / stride;
    return total;
  }
};

// Runs forward and backward; returns the first non-zero status (or 0). `corrupt` edits the inputs.
template <typename Corrupt>
int run_compress(const Compress &c, Corrupt corrupt) {
  Buffer input({sum(c.lens), c.heads, c.dim}, c.dtype), weight({c.block, c.heads}, c.dtype);
  Buffer cu = cumulative(c.lens);
  Buffer out({c.windows(), c.heads, c.dim}, c.dtype);
  fill_random(input);
  fill_random(weight);
  corrupt(input, weight, cu, out);
  const std::map<std::string, int64_t> attrs{{"compress_block_size", c.block}, {"compress_stride", c.stride}};
  int status = driver::call_entry("NsaCompress", NsaCompressInit, NsaCompress, {&input, &weight, &cu, &out}, attrs);
  Buffer grad = out, input_grad(input.shape, input.dtype), weight_grad(weight.shape, weight.dtype);
  fill_random(grad);
  const int backward = driver::call_entry("NsaCompressGrad", NsaCompressGradInit, NsaCompressGrad,
                                          {&grad, &input, &weight, &cu, &input_grad, &weight_grad}, attrs);
  expect(backward == status, "nsa_compress: forward status " + std::to_string(status) + " but backward " +
                                 std::to_string(backward));
  if (status == 0) expect(driver::all_finite(out) && driver::all_finite(input_grad), "nsa_compress: non-finite");
  return status;
}

void compress_cases() {
  auto untouched = [](Buffer &, Buffer &, Buffer &, Buffer &) {};
  for (const char *dtype : {"float32", "float16", "bfloat16"}) {
    Compress c;
    c.dtype = dtype;
    expect(run_compress(c, untouched) == 0, std::string("nsa_compress valid ") + dtype);
    c.lens = {16, 15, 47};  // d == l, a segment shorter than l
    c.block = c.stride = 16;
    expect(run_compress(c, untouched) == 0, std::string("nsa_compress d == l ") + dtype);
    driver::valid_runs += 2;
  }
  const Compress base;
  struct Bad {
    const char *name;
    int want;
    void (*corrupt)(Buffer &, Buffer &, Buffer &, Buffer &);
  };
  const Bad bad[] = {
      {"lengths decreasing", ms_nsa::kBadCumulativeLength,
       [](Buffer &, Buffer &, Buffer &cu, Buffer &) { cu.as<int64_t>()[1] = 10; }},
      {"lengths short of T", ms_nsa::kBadCumulativeLength,
       [](Buffer &, Buffer &, Buffer &cu, Buffer &) { cu.as<int64_t>()[2] = 151; }},
      {"lengths past T (more windows than rows)", ms_nsa::kBadCumulativeLength,
       [](Buffer &, Buffer &, Buffer &cu, Buffer &) { cu.as<int64_t>()[2] = 1000; }},
      {"lengths giving another window count", ms_nsa::kBadProblem,
       [](Buffer &, Buffer &, Buffer &cu, Buffer &) { cu.as<int64_t>()[0] = 52; }},
      {"weight rows != l", ms_nsa::kBadProblem, [](Buffer &, Buffer &w, Buffer &, Buffer &) { w.shape[0] = 16; }},
      {"float64 input", ms_nsa::kUnsupportedDType, [](Buffer &in, Buffer &, Buffer &, Buffer &) { in.dtype = "float64"; }},
      {"int32 lengths", ms_nsa::kBadProblem, [](Buffer &, Buffer &, Buffer &cu, Buffer &) { cu.dtype = "int32"; }},
  };
  for (const Bad &b : bad) {
    const int got = run_compress(base, b.corrupt);
    expect(got == b.want, std::string("nsa_compress ") + b.name + ": status " + std::to_string(got));
    ++driver::invalid_runs;
  }
}

// ---- nsa_compress_attention ------------------------------------------------------------------------
struct Attention {
  std::vector<int64_t> q_lens{9, 0, 14}, kv_lens{10, 3, 19};
  int64_t q_heads = 4, kv_heads = 2, dim = 32, v_dim = 16;
  int64_t block = 32, stride = 16, select = 64, count = 2;
  bool atten_mask = true, topk_mask = true, sel_lengths = true;
  std::string dtype = "float32";

  std::vector<int64_t> blocks() const {
    std::vector<int64_t> out;
    const int64_t m = select / stride;
    for (int64_t n : kv_lens) out.push_back((n + m - 1) / m);
    return out;
  }
};

struct AttentionBuffers {
  Buffer q, k, v, atten, topk_mask, cu_q, cu_kv, cu_sel, smax, ssum, out, topk, grad, dq, dk, dv;
  explicit AttentionBuffers(const Attention &a)
      : q({sum(a.q_lens), a.q_heads, a.dim}, a.dtype), k({sum(a.kv_lens), a.kv_heads, a.dim}, a.dtype),
        v({sum(a.kv_lens), a.kv_heads, a.v_dim}, a.dtype), atten({16, 20}, "bool"), topk_mask({16, 5}, "uint8"),
        cu_q(cumulative(a.q_lens)), cu_kv(cumulative(a.kv_lens)), cu_sel(cumulative(a.blocks())),
        smax({sum(a.q_lens), a.q_heads, 8}, "float32"), ssum(smax), out({sum(a.q_lens), a.q_heads, a.v_dim}, a.dtype),
        topk({sum(a.q_lens), a.kv_heads, a.count}, "int32"), grad(out), dq(q), dk(k), dv(v) {
    fill_random(q);
    fill_random(k);
    fill_random(v);
    fill_random(grad);
    for (int64_t i = 0; i < atten.count(); ++i) atten.bytes[i] = driver::rng() % 4 == 0;
    for (int64_t i = 0; i < topk_mask.count(); ++i) topk_mask.bytes[i] = driver::rng() % 8 == 0;
  }
};

template <typename Corrupt>
int run_attention(const Attention &a, Corrupt corrupt) {
  AttentionBuffers x(a);
  Attention attrs_of = a;
  corrupt(x, attrs_of);
  const std::map<std::string, int64_t> attrs{
      {"head_num", attrs_of.q_heads},        {"compress_block_size", a.block},
      {"compress_stride", a.stride},         {"select_block_size", a.select},
      {"select_block_count", a.count},       {"has_atten_mask", a.atten_mask},
      {"has_topk_mask", a.topk_mask},        {"has_actual_sel_seq_kvlen", a.sel_lengths}};
  const int status = driver::call_entry("NsaCompressAttention", NsaCompressAttentionInit, NsaCompressAttention,
      {&x.q, &x.k, &x.v, &x.atten, &x.topk_mask, &x.cu_q, &x.cu_kv, &x.cu_sel, &x.smax, &x.ssum, &x.out, &x.topk},
      attrs);
  if (status != 0) return status;
  expect(driver::all_finite(x.out), "nsa_compress_attention: non-finite output");
  const int backward = driver::call_entry("NsaCompressAttentionGrad", NsaCompressAttentionGradInit, NsaCompressAttentionGrad,
      {&x.q, &x.k, &x.v, &x.out, &x.grad, &x.smax, &x.ssum, &x.atten, &x.cu_q, &x.cu_kv, &x.dq, &x.dk, &x.dv}, attrs);
  expect(backward == 0 && driver::all_finite(x.dq) && driver::all_finite(x.dk) && driver::all_finite(x.dv),
         "nsa_compress_attention: backward failed after a valid forward");
  return 0;
}

void attention_cases() {
  auto untouched = [](AttentionBuffers &, Attention &) {};
  for (const char *dtype : {"float32", "float16", "bfloat16"}) {
    for (int masks = 0; masks < 2; ++masks) {
      Attention a;
      a.dtype = dtype;
      a.atten_mask = a.topk_mask = a.sel_lengths = masks == 1;
      expect(run_attention(a, untouched) == 0, std::string("attention valid ") + dtype);
      Attention wide = a;  // G = 32, D 192 / Dv 128, one batch
      wide.q_lens = {5};
      wide.kv_lens = {17};
      wide.q_heads = 32;
      wide.kv_heads = 1;
      wide.dim = 192;
      wide.v_dim = 128;
      expect(run_attention(wide, untouched) == 0, std::string("attention G=32 ") + dtype);
      driver::valid_runs += 2;
    }
  }
  const Attention base;
  struct Bad {
    const char *name;
    int want;
    void (*corrupt)(AttentionBuffers &, Attention &);
  };
  const Bad bad[] = {
      {"cu_q decreasing", ms_nsa::kBadCumulativeLength,
       [](AttentionBuffers &x, Attention &) { x.cu_q.as<int64_t>()[0] = 20; }},
      {"cu_kv short of T2", ms_nsa::kBadCumulativeLength,
       [](AttentionBuffers &x, Attention &) { x.cu_kv.as<int64_t>()[2] = 30; }},
      {"cu_kv huge", ms_nsa::kBadCumulativeLength,
       [](AttentionBuffers &x, Attention &) { x.cu_kv.as<int64_t>()[0] = INT64_MAX; }},
      {"too few selection blocks", ms_nsa::kBadKvLength,
       [](AttentionBuffers &x, Attention &) { x.cu_kv.as<int64_t>()[0] = 4; }},
      {"selection lengths wrong", ms_nsa::kBadKvLength,
       [](AttentionBuffers &x, Attention &) { x.cu_sel.as<int64_t>()[0] = 2; }},
      {"atten_mask too small", ms_nsa::kBadProblem, [](AttentionBuffers &x, Attention &) { x.atten.shape = {16, 18}; }},
      {"topk_mask too small", ms_nsa::kBadProblem, [](AttentionBuffers &x, Attention &) { x.topk_mask.shape = {8, 5}; }},
      {"head_num != N1", ms_nsa::kBadProblem, [](AttentionBuffers &, Attention &a) { a.q_heads = 3; }},
      {"float64 query", ms_nsa::kUnsupportedDType, [](AttentionBuffers &x, Attention &) { x.q.dtype = "float64"; }},
      {"float32 mask", ms_nsa::kBadProblem, [](AttentionBuffers &x, Attention &) { x.atten.dtype = "float32"; }},
  };
  for (const Bad &b : bad) {
    const int got = run_attention(base, b.corrupt);
    expect(got == b.want, std::string("attention ") + b.name + ": status " + std::to_string(got));
    ++driver::invalid_runs;
  }
}

int random_corruptions() {
  std::uniform_int_distribution<int64_t> wide(-60, 200);
  int cases = 0;
  for (int trial = 0; trial < 300; ++trial, ++cases) {
    const int64_t value = wide(driver::rng);
    const int64_t slot = static_cast<int64_t>(driver::rng() % 3);
    if (trial % 2 == 0) {
      const int status = run_compress(Compress{}, [&](Buffer &, Buffer &, Buffer &cu, Buffer &) {
        cu.as<int64_t>()[slot] = value;
      });
      expect(status == 0 || status == ms_nsa::kBadCumulativeLength || status == ms_nsa::kBadProblem,
             "compress corruption returned " + std::to_string(status));
    } else {
      const int which = trial % 3;
      const int status = run_attention(Attention{}, [&](AttentionBuffers &x, Attention &) {
        Buffer &target = which == 0 ? x.cu_q : which == 1 ? x.cu_kv : x.cu_sel;
        target.as<int64_t>()[slot] = value;
      });
      expect(status == 0 || status == ms_nsa::kBadCumulativeLength || status == ms_nsa::kBadKvLength ||
                 status == ms_nsa::kBadProblem,
             "attention corruption returned " + std::to_string(status));
    }
  }
  return cases;
}

}  // namespace

int main() {
  compress_cases();
  attention_cases();
  const int random_cases = random_corruptions();
  std::printf("sanitize_compress_driver: %d valid problems, %d invalid problems, %d random corruptions, %d failures\n",
              driver::valid_runs, driver::invalid_runs, random_cases, driver::failures);
  return driver::failures == 0 ? 0 : 1;
}
