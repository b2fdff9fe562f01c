// Packed variable-length batches (layout TND): cumulative lengths, one entry per batch, the last equal
// to the token count. One definition of the check and of "which batch holds token t", shared by every op.
#ifndef MS_NSA_NSA_VARLEN_H_
#define MS_NSA_NSA_VARLEN_H_

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>

#include "nsa_status.h"

namespace ms_nsa {

// A view of one cumulative-length array: batch b owns tokens [begin(b), end(b)).
struct Segments {
  const int64_t *cumulative = nullptr;
  int64_t count = 0;

  int64_t begin(int64_t b) const { return b == 0 ? 0 : cumulative[b - 1]; }
  int64_t end(int64_t b) const { return cumulative[b]; }
  int64_t length(int64_t b) const { return end(b) - begin(b); }
  // The batch holding token t (the first whose end exceeds t; empty batches are stepped over).
  int64_t batch_of(int64_t t) const {
    return std::upper_bound(cumulative, cumulative + count, t) - cumulative;
  }
};

// The usual mistake is passing per-batch lengths: when the entries add up to the token count, the
// message shows their running sum, which is what was meant.
inline std::string running_sum_hint(const int64_t *cu, int64_t count, int64_t total) {
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

// Non-decreasing, non-negative, ending at `total`. `name` is the argument the user passed.
inline NsaError check_cumulative(const char *name, const int64_t *cu, int64_t count, int64_t total,
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

}  // namespace ms_nsa

#endif  // MS_NSA_NSA_VARLEN_H_
