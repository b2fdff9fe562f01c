// Standalone ASan/UBSan driver for nsa_window_attention(_grad): calls their AOT entry points as
// MindSpore does, on exactly-sized buffers, with valid problems (all dtypes, windows shorter and longer
// than a tile or a sequence, varlen batches with empty and one-token sequences, GQA), every
// data-dependent error and random corruptions of the cumulative lengths. Exit code 0 only if every
// call returned the expected status. Built and run by tests/test_sanitizers.py.
#include <cstdint>
#include <string>
#include <vector>

#include "../nsa_status.h"
#include "driver_common.h"

extern "C" {
int NsaWindowAttentionInit(int *, int64_t **, const char **, mindspore::AotExtra *);
int NsaWindowAttention(int, void **, int *, int64_t **, const char **, void *, void *);
int NsaWindowAttentionGradInit(int *, int64_t **, const char **, mindspore::AotExtra *);
int NsaWindowAttentionGrad(int, void **, int *, int64_t **, const char **, void *, void *);
}

namespace {

using driver::Buffer;
using driver::expect;
using driver::fill_random;

struct WindowCase {
  std::vector<int64_t> lens{30, 20};
  int64_t q_heads = 4, kv_heads = 2, dim = 32, v_dim = 16, window = 16;
  std::string dtype = "float32";

  int64_t tokens() const {
    int64_t total = 0;
    for (int64_t n : lens) total += n;
    return total;
  }
};

struct WindowTensors {
  Buffer q, k, v, cu, softmax_max, softmax_sum, out, d_out, dq, dk, dv;
  explicit WindowTensors(const WindowCase &c)
      : q({c.tokens(), c.q_heads, c.dim}, c.dtype), k({c.tokens(), c.kv_heads, c.dim}, c.dtype),
        v({c.tokens(), c.kv_heads, c.v_dim}, c.dtype), cu({static_cast<int64_t>(c.lens.size())}, "int64"),
        softmax_max({c.tokens(), c.q_heads, 8}, "float32"), softmax_sum({c.tokens(), c.q_heads, 8}, "float32"),
        out({c.tokens(), c.q_heads, c.v_dim}, c.dtype), d_out(out.shape, c.dtype), dq(q.shape, c.dtype),
        dk(k.shape, c.dtype), dv(v.shape, c.dtype) {
    fill_random(q);
    fill_random(k);
    fill_random(v);
    fill_random(d_out);
    int64_t total = 0;
    for (size_t b = 0; b < c.lens.size(); ++b) cu.as<int64_t>()[b] = total += c.lens[b];
  }
};

// Forward and backward on the same tensors; returns both statuses.
std::pair<int, int> run(WindowTensors &t, const WindowCase &c) {
  const std::map<std::string, int64_t> attrs{{"head_num", c.q_heads}, {"window_size", c.window}};
  const int forward = driver::call_entry("NsaWindowAttention", NsaWindowAttentionInit, NsaWindowAttention,
                                         {&t.q, &t.k, &t.v, &t.cu, &t.softmax_max, &t.softmax_sum, &t.out}, attrs);
  const int backward = driver::call_entry("NsaWindowAttentionGrad", NsaWindowAttentionGradInit, NsaWindowAttentionGrad,
      {&t.q, &t.k, &t.v, &t.out, &t.d_out, &t.softmax_max, &t.softmax_sum, &t.cu, &t.dq, &t.dk, &t.dv}, attrs);
  return {forward, backward};
}

void run_valid(const WindowCase &c, const std::string &name) {
  WindowTensors t(c);
  const auto [forward, backward] = run(t, c);
  expect(forward == 0 && backward == 0, name + ": returned " + std::to_string(forward) + " / " +
                                            std::to_string(backward));
  expect(driver::all_finite(t.out) && driver::all_finite(t.dq) && driver::all_finite(t.dk) &&
             driver::all_finite(t.dv), name + ": non-finite output from finite inputs");
  ++driver::valid_runs;
}

// `corrupt` edits the tensors (or, through the case, the attributes) after they are built.
void run_invalid(WindowCase c, const std::string &name, int want, void (*corrupt)(WindowTensors &, WindowCase &)) {
  WindowTensors t(c);
  corrupt(t, c);
  const auto [forward, backward] = run(t, c);
  expect(forward == want && backward == want, name + ": returned " + std::to_string(forward) + " / " +
                                                  std::to_string(backward) + ", want " + std::to_string(want));
  ++driver::invalid_runs;
}

// One cumulative length set to a random value: either still valid (both run) or kBadCumulativeLength.
int random_corruptions() {
  std::uniform_int_distribution<int64_t> value(-60, 110);
  int cases = 0;
  for (int trial = 0; trial < 300; ++trial) {
    WindowCase c;
    c.lens = {30, 0, 20, 1};
    c.window = 1 + trial % 40;
    WindowTensors t(c);
    t.cu.as<int64_t>()[driver::rng() % 4] = value(driver::rng);
    const auto [forward, backward] = run(t, c);
    expect((forward == 0 || forward == ms_nsa::kBadCumulativeLength) && backward == forward,
           "random corruption returned " + std::to_string(forward) + " / " + std::to_string(backward));
    ++cases;
  }
  return cases;
}

}  // namespace

int main() {
  using ms_nsa::kBadCumulativeLength;
  using ms_nsa::kBadProblem;
  for (const char *dtype : {"float32", "float16", "bfloat16"}) {
    for (int64_t window : {1, 5, 16, 70, 1000}) {
      WindowCase c;
      c.lens = {37, 0, 1, 90};
      c.window = window;
      c.dtype = dtype;
      run_valid(c, std::string("varlen w=") + std::to_string(window) + " " + dtype);
    }
    WindowCase wide;
    wide.lens = {130};
    wide.q_heads = 32;
    wide.kv_heads = 1;
    wide.dim = 192;
    wide.v_dim = 128;
    wide.window = 64;
    wide.dtype = dtype;
    run_valid(wide, std::string("G=32 D=192 ") + dtype);
  }
  const WindowCase base;
  run_invalid(base, "cu decreasing", kBadCumulativeLength, [](WindowTensors &t, WindowCase &) { t.cu.as<int64_t>()[0] = 60; });
  run_invalid(base, "cu short of T", kBadCumulativeLength, [](WindowTensors &t, WindowCase &) { t.cu.as<int64_t>()[1] = 49; });
  run_invalid(base, "cu negative", kBadCumulativeLength, [](WindowTensors &t, WindowCase &) { t.cu.as<int64_t>()[0] = -5; });
  run_invalid(base, "cu huge", kBadCumulativeLength, [](WindowTensors &t, WindowCase &) { t.cu.as<int64_t>()[0] = INT64_MAX; });
  run_invalid(base, "window_size 0", kBadProblem, [](WindowTensors &, WindowCase &c) { c.window = 0; });
  run_invalid(base, "head_num != N1", kBadProblem, [](WindowTensors &, WindowCase &c) { c.q_heads = 8; });
  run_invalid(base, "key of other tokens", kBadProblem, [](WindowTensors &t, WindowCase &) { t.k.shape[0] = 49; });
  run_invalid(base, "no sequences", kBadProblem, [](WindowTensors &t, WindowCase &) { t.cu.shape[0] = 0; });
  run_invalid(base, "int32 lengths", kBadProblem, [](WindowTensors &t, WindowCase &) { t.cu.dtype = "int32"; });
  run_invalid(base, "float64 query", ms_nsa::kUnsupportedDType, [](WindowTensors &t, WindowCase &) { t.q.dtype = "float64"; });
  run_invalid(base, "N1 not a multiple of N2", kBadProblem, [](WindowTensors &t, WindowCase &c) {
    t.q.shape[1] = 3;
    c.q_heads = 3;
  });
  const int random_cases = random_corruptions();
  std::printf("sanitize_window_driver: %d valid problems, %d invalid problems, %d random corruptions, %d failures\n",
              driver::valid_runs, driver::invalid_runs, random_cases, driver::failures);
  return driver::failures == 0 ? 0 : 1;
}
