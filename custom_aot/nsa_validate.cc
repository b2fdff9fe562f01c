// Validation of an NSA problem before any tensor data is read: sizes, cumulative lengths, per-batch
// KV lengths and every topk index. Messages name the argument, the value and what is allowed.
#include <sstream>
#include <string>

#include "nsa_core.h"
#include "nsa_geometry.h"

namespace ms_nsa {
namespace {

std::string describe_problem_error(const NsaProblem &p) {
  std::ostringstream msg;
  if (p.q_tokens < 0 || p.kv_tokens < 0) {
    msg << "token counts must be non-negative, got T1=" << p.q_tokens << ", T2=" << p.kv_tokens;
  } else if (p.q_heads < 1 || p.kv_heads < 1 || p.q_heads % p.kv_heads != 0) {
    msg << "head counts must be positive with N1 a multiple of N2, got N1=" << p.q_heads
        << ", N2=" << p.kv_heads;
  } else if (p.qk_head_dim < 1 || p.v_head_dim < 1) {
    msg << "head dims must be positive, got D=" << p.qk_head_dim << ", Dv=" << p.v_head_dim;
  } else if (p.select_block_size < 1 || p.select_block_count < 1) {
    msg << "select_block_size and select_block_count must be positive, got " << p.select_block_size
        << " and " << p.select_block_count;
  } else if (p.batch_count < 1 || p.cu_seqlens_q == nullptr || p.cu_seqlens_kv == nullptr) {
    msg << "actual_seq_qlen and actual_seq_kvlen must hold at least one entry, got " << p.batch_count;
  }
  return msg.str();
}

// The usual mistake is passing per-batch lengths: when the entries add up to the token count, the
// message shows their running sum, which is what was meant.
std::string running_sum_hint(const int64_t *cu, int64_t count, int64_t total) {
  constexpr int64_t kMaxShown = 16;
  int64_t sum = 0;
  for (int64_t b = 0; b < count; ++b) {
    if (cu[b] < 0 || cu[b] > total - sum) return "";  // also keeps the sum from overflowing
    sum += cu[b];
  }
  if (count < 2 || sum != total) return "";
  std::ostringstream hint;
  hint << "; if these are per-batch lengths, pass their running sum";
  if (count > kMaxShown) return hint.str() + " (numpy.cumsum)";
  hint << ": [";
  sum = 0;
  for (int64_t b = 0; b < count; ++b) hint << (b ? ", " : "") << (sum += cu[b]);
  hint << "]";
  return hint.str();
}

NsaError check_cumulative(const char *name, const int64_t *cu, int64_t count, int64_t total,
                          const char *total_name) {
  int64_t previous = 0;
  for (int64_t b = 0; b < count; ++b) {
    if (cu[b] < previous) {
      std::ostringstream msg;
      msg << name << "[" << b << "] = " << cu[b] << " is smaller than the entry before it (" << previous
          << "); cumulative lengths must be non-decreasing and start at 0 or more"
          << running_sum_hint(cu, count, total);
      return {kBadCumulativeLength, msg.str()};
    }
    previous = cu[b];
  }
  if (previous != total) {
    std::ostringstream msg;
    msg << name << "[-1] = " << previous << " must equal " << total_name << " = " << total
        << " (lengths are cumulative: the last entry is the total token count)"
        << running_sum_hint(cu, count, total);
    return {kBadCumulativeLength, msg.str()};
  }
  return {};
}

}  // namespace

NsaError nsa_validate(const NsaProblem &p, const int32_t *topk_indices) {
  const std::string problem_error = describe_problem_error(p);
  if (!problem_error.empty()) return {kBadProblem, problem_error};
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) {
    return {kUnsupportedDType, "query dtype must be float32, float16 or bfloat16"};
  }
  NsaError err = check_cumulative("actual_seq_qlen", p.cu_seqlens_q, p.batch_count, p.q_tokens, "T1");
  if (err.status != kOk) return err;
  err = check_cumulative("actual_seq_kvlen", p.cu_seqlens_kv, p.batch_count, p.kv_tokens, "T2");
  if (err.status != kOk) return err;

  const int64_t beta = p.select_block_size, count = p.select_block_count;
  for (int64_t b = 0; b < p.batch_count; ++b) {
    const int64_t q_len = p.cu_seqlens_q[b] - (b == 0 ? 0 : p.cu_seqlens_q[b - 1]);
    const int64_t kv_len = p.cu_seqlens_kv[b] - (b == 0 ? 0 : p.cu_seqlens_kv[b - 1]);
    if (q_len == 0) continue;  // a batch without queries reads nothing
    if (kv_len % beta != 0 || kv_len < beta * count) {
      std::ostringstream msg;
      msg << "batch " << b << " has KV length " << kv_len << " (from actual_seq_kvlen); it must be a "
          << "multiple of select_block_size = " << beta << " and at least select_block_size * "
          << "select_block_count = " << beta * count;
      return {kBadKvLength, msg.str()};
    }
  }
  for (int64_t t = 0; t < p.q_tokens; ++t) {
    const QueryRow row = locate_query_row(p, t);
    const int64_t kv_end = p.cu_seqlens_kv[row.batch];
    const int64_t block_limit = (kv_end - row.kv_begin) / beta;
    const int32_t *idx = topk_indices + t * p.kv_heads * count;
    for (int64_t j = 0; j < p.kv_heads * count; ++j) {
      if (idx[j] < 0 || idx[j] >= block_limit) {
        std::ostringstream msg;
        msg << "topk_indices[" << t << ", " << j / count << ", " << j % count << "] = " << idx[j]
            << " is out of range: query row " << t << " is in batch " << row.batch << " whose KV length "
            << "is " << kv_end - row.kv_begin << ", so block indices must lie in [0, " << block_limit
            << ") for select_block_size = " << beta;
        return {kIndexOutOfRange, msg.str()};
      }
    }
  }
  return {};
}

}  // namespace ms_nsa
