// What every CPU kernel of ms_nsa shares at its interface: the element types and the status codes
// (ms_nsa/_errors.py maps the codes to Python exceptions; keep the two in step).
#ifndef MS_NSA_NSA_STATUS_H_
#define MS_NSA_NSA_STATUS_H_

#include <string>

namespace ms_nsa {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

enum Status : int {
  kOk = 0,
  kBadProblem = 1,          // sizes or attributes outside what the kernel accepts
  kBadCumulativeLength = 2, // cumulative lengths decreasing, negative or not ending at the token count
  kBadKvLength = 3,         // a batch's KV length the op cannot use (too short, wrong multiple, ...)
  kIndexOutOfRange = 4,     // a topk index outside [0, that batch's KV length / beta)
  kUnsupportedDType = 5,
  kInternal = 6,
};

struct NsaError {
  Status status = kOk;
  std::string message;  // what went wrong, naming the argument, the value and what is allowed
};

}  // namespace ms_nsa

#endif  // MS_NSA_NSA_STATUS_H_
