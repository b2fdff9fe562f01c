// The error channel shared by all AOT entry points, and its C interface for ctypes.
#include "aot_common.h"

#include <mutex>
#include <stdexcept>
#include <string>

#include "nsa_core.h"

namespace ms_nsa {
namespace aot {
namespace {

std::mutex g_error_mutex;
std::string g_last_error;
int g_last_status = 0;

}  // namespace

void record(const NsaError &err) {
  std::lock_guard<std::mutex> lock(g_error_mutex);
  g_last_error = err.message;
  g_last_status = err.status;
}

int report(const char *function, const NsaError &err) {
  if (err.status == kOk) return 0;
  record(err);
  throw std::invalid_argument(std::string(function) + ": " + err.message);
}

}  // namespace aot
}  // namespace ms_nsa

extern "C" {

// Introspection for the Python layer (ctypes): the last error's message and status, thread count.
const char *ms_nsa_last_error_message() {
  static thread_local std::string copy;
  std::lock_guard<std::mutex> lock(ms_nsa::aot::g_error_mutex);
  copy = ms_nsa::aot::g_last_error;
  return copy.c_str();
}

int ms_nsa_last_error_status() {
  std::lock_guard<std::mutex> lock(ms_nsa::aot::g_error_mutex);
  return ms_nsa::aot::g_last_status;
}

void ms_nsa_clear_error() {
  std::lock_guard<std::mutex> lock(ms_nsa::aot::g_error_mutex);
  ms_nsa::aot::g_last_error.clear();
  ms_nsa::aot::g_last_status = 0;
}

void ms_nsa_set_num_threads(int num_threads) { ms_nsa::nsa_set_num_threads(num_threads); }
int ms_nsa_get_num_threads() { return ms_nsa::nsa_get_num_threads(); }

}  // extern "C"
