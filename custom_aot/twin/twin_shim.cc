// The Ascend twin's CPU-convention shim and the argument record (see twin.h).
//
// MindSpore's CPU AOT kernel calls `entry(nparam, params, ndims, shapes, dtypes, stream, extra)` with the
// call inputs then the outputs. The shim does what CustomV2AclnnKernelMod does on Ascend: it converts
// input i by the i-th type of the aclnn prototype (the primitive's `custom_inputs_type`, which MindSpore
// read from the header) and calls the callback MindSpore generated and compiled from that header, which
// casts each element and calls the aclnn op's GetWorkspaceSize; then it launches the op.
#include <dlfcn.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "twin.h"

namespace ms_nsa::twin {
namespace {

std::mutex g_record_mutex;
std::string g_record;

using Callback = int (*)(void *, std::vector<void *>, std::vector<void *>, uint64_t *, aclOpExecutor **);

struct ShimData : public mindspore::AotKernelData {
  void *get_workspace_size = nullptr;
  LaunchFn launch = nullptr;
  Callback callback = nullptr;
  std::vector<std::string> types;  // the prototype's types of every input and output, in order
  int64_t outputs = 0;
};

std::vector<std::string> split(const std::string &text, char separator) {
  std::vector<std::string> parts;
  std::stringstream stream(text);
  std::string part;
  while (std::getline(stream, part, separator)) parts.push_back(part);
  return parts;
}

[[noreturn]] void raise(const std::string &message) {
  // MindSpore turns an exception from an AOT kernel into a RuntimeError carrying what().
  throw std::runtime_error("ms_nsa Ascend twin: " + message);
}

template <typename T>
T scalar(const char *dtype, const void *value, int position) {
  if (value == nullptr) raise("input " + std::to_string(position) + " is None but the prototype takes a scalar");
  if (std::strcmp(dtype, "float32") == 0) return static_cast<T>(*static_cast<const float *>(value));
  if (std::strcmp(dtype, "float64") == 0) return static_cast<T>(*static_cast<const double *>(value));
  if (std::strcmp(dtype, "int64") == 0) return static_cast<T>(*static_cast<const int64_t *>(value));
  if (std::strcmp(dtype, "int32") == 0) return static_cast<T>(*static_cast<const int32_t *>(value));
  raise("input " + std::to_string(position) + " has dtype " + dtype + ", not a scalar the prototype takes");
}

}  // namespace

void record(const std::string &line) {
  std::lock_guard<std::mutex> lock(g_record_mutex);
  g_record += line;
  g_record += '\n';
}

void record_call(const char *aclnn_name) { record(std::string("call ") + aclnn_name); }

void record_tensor(const aclTensor *tensor) {
  if (tensor == nullptr) return record("null");
  std::string line = std::string("tensor ") + tensor->dtype + " ";
  for (int64_t d = 0; d < tensor->ndim; ++d) line += (d ? "x" : "") + std::to_string(tensor->shape[d]);
  record(line);
}

void record_int_array(const aclIntArray *array) {
  if (array == nullptr) return record("null");
  std::string line = "int_array ";
  for (int64_t i = 0; i < array->size; ++i) line += (i ? "," : "") + std::to_string(array->values[i]);
  record(line);
}

void record_double(double value) {
  char text[64];
  std::snprintf(text, sizeof text, "double %.17g", value);
  record(text);
}

void record_int(int64_t value) { record("int " + std::to_string(value)); }

void record_str(const char *value) { record(value == nullptr ? std::string("null") : std::string("str ") + value); }

void record_tail(uint64_t *workspace_size, aclOpExecutor **executor) {
  record(workspace_size != nullptr ? "workspace_size" : "null");
  record(executor != nullptr ? "executor" : "null");
}

aclnnStatus fail(const std::string &message) {
  record("error " + message);
  std::fprintf(stderr, "ms_nsa Ascend twin stand-in: %s\n", message.c_str());
  return 161001;  // CANN's ACLNN_ERR_PARAM_INVALID
}

aclOpExecutor *executor_for(std::function<NsaError()> work) {
  return new aclOpExecutor{[work]() -> aclnnStatus {
    const NsaError err = work();
    return err.status == kOk ? 0 : fail(err.message);
  }};
}

aclnnStatus launch(aclOpExecutor *executor) {
  if (executor == nullptr) return fail("launch without an executor");
  std::unique_ptr<aclOpExecutor> owned(executor);
  return owned->run();
}

bool has_dtype(const aclTensor *tensor, std::initializer_list<const char *> names) {
  if (tensor == nullptr) return false;
  for (const char *name : names) {
    if (std::strcmp(tensor->dtype, name) == 0) return true;
  }
  return false;
}

std::vector<int64_t> values(const aclIntArray *array) {
  return array == nullptr ? std::vector<int64_t>{} : std::vector<int64_t>(array->values, array->values + array->size);
}

int64_t longest_batch(const std::vector<int64_t> &cumulative) {
  int64_t longest = 0, begin = 0;
  for (int64_t end : cumulative) {
    longest = std::max(longest, end - begin);
    begin = end;
  }
  return longest;
}

namespace {
// Calls visit(row in ms_nsa's order, row in CANN's order) for every (query row, head).
template <typename Visit>
void for_each_softmax_row(const std::vector<int64_t> &cu_q, int64_t heads, Visit visit) {
  int64_t begin = 0;
  for (int64_t end : cu_q) {
    const int64_t length = end - begin;
    for (int64_t i = 0; i < length; ++i) {
      for (int64_t n = 0; n < heads; ++n) visit((begin + i) * heads + n, begin * heads + n * length + i);
    }
    begin = end;
  }
}
constexpr int64_t kStatWidth = 8;
}  // namespace

void softmax_rows_to_cann(const std::vector<int64_t> &cu_q, int64_t heads, const float *rows, float *cann) {
  for_each_softmax_row(cu_q, heads, [&](int64_t ours, int64_t theirs) {
    std::memcpy(cann + theirs * kStatWidth, rows + ours * kStatWidth, kStatWidth * sizeof(float));
  });
}

void softmax_cann_to_rows(const std::vector<int64_t> &cu_q, int64_t heads, const float *cann, float *rows) {
  for_each_softmax_row(cu_q, heads, [&](int64_t ours, int64_t theirs) {
    std::memcpy(rows + ours * kStatWidth, cann + theirs * kStatWidth, kStatWidth * sizeof(float));
  });
}

int shim_init(mindspore::AotExtra *extra, GetWorkspaceSizeFn get_workspace_size, LaunchFn launch) {
  auto *data = new ShimData;
  data->get_workspace_size = get_workspace_size;
  data->launch = launch;
  data->types = split(extra->GetAttrStr("ms_nsa_twin_inputs_type"), ',');
  data->outputs = extra->GetAttrInt("ms_nsa_twin_outputs");
  const std::string callback = extra->GetAttrStr("custom_callback_func");
  const size_t colon = callback.rfind(':');
  if (colon == std::string::npos) raise("custom_callback_func '" + callback + "' is not 'library:function'");
  void *library = dlopen(callback.substr(0, colon).c_str(), RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) raise(std::string("cannot load the generated callback: ") + dlerror());
  const std::string symbol = callback.substr(colon + 1) + "GetWorkSpaceSize";
  data->callback = reinterpret_cast<Callback>(dlsym(library, symbol.c_str()));
  if (data->callback == nullptr) raise("the generated callback library has no " + symbol);
  extra->SetKernelData(data);
  return 0;
}

int shim_run(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
             void *extra) {
  const auto *data = static_cast<const ShimData *>(static_cast<mindspore::AotExtra *>(extra)->KernelData());
  if (data == nullptr) raise("the kernel was not initialised");
  // CustomV2AclnnKernelMod's check: the header's types must cover exactly the node's inputs + outputs.
  if (static_cast<size_t>(nparam) != data->types.size()) {
    raise("the aclnn prototype has " + std::to_string(data->types.size()) + " inputs and outputs but the kernel "
          "received " + std::to_string(nparam) + " parameters");
  }
  std::vector<aclTensor> tensors(nparam);
  std::vector<aclIntArray> arrays(nparam);
  std::vector<double> doubles(nparam);
  std::vector<int64_t> ints(nparam);
  std::vector<std::string> strings(nparam);
  std::vector<void *> inputs, outputs;
  const int first_output = nparam - static_cast<int>(data->outputs);
  for (int i = 0; i < nparam; ++i) {
    const std::string &type = data->types[i];
    void *converted = nullptr;
    if (type == "aclTensor*") {
      if (std::strcmp(dtypes[i], "none") != 0) {
        tensors[i] = {params[i], dtypes[i], ndims[i], shapes[i]};
        converted = &tensors[i];
      }
    } else if (type == "aclIntArray*") {
      if (std::strcmp(dtypes[i], "none") != 0) {
        if (std::strcmp(dtypes[i], "int64") != 0 || ndims[i] != 1) raise("input " + std::to_string(i) + " is not a tuple of ints");
        arrays[i] = {static_cast<const int64_t *>(params[i]), shapes[i][0]};
        converted = &arrays[i];
      }
    } else if (type == "double") {
      doubles[i] = scalar<double>(dtypes[i], params[i], i);
      converted = &doubles[i];
    } else if (type == "int64_t") {
      ints[i] = scalar<int64_t>(dtypes[i], params[i], i);
      converted = &ints[i];
    } else if (type == "char*") {
      // The CPU pipeline cannot carry a str input (docs/ascend.md): the twin passes its characters as
      // a tuple of ints, and this is where it becomes the char* the prototype takes again.
      if (std::strcmp(dtypes[i], "int64") != 0 || ndims[i] != 1) raise("input " + std::to_string(i) + " is not a string");
      const auto *codes = static_cast<const int64_t *>(params[i]);
      for (int64_t c = 0; c < shapes[i][0]; ++c) strings[i].push_back(static_cast<char>(codes[c]));
      converted = strings[i].data();
    } else {
      raise("the twin does not convert the aclnn type " + type);
    }
    (i < first_output ? inputs : outputs).push_back(converted);
  }
  uint64_t workspace_size = 0;
  aclOpExecutor *executor = nullptr;
  int status = data->callback(data->get_workspace_size, inputs, outputs, &workspace_size, &executor);
  if (status != 0) raise("GetWorkspaceSize returned " + std::to_string(status));
  std::vector<unsigned char> workspace(workspace_size);
  status = data->launch(workspace.data(), workspace_size, executor, stream);
  if (status != 0) raise("the aclnn launch returned " + std::to_string(status));
  return 0;
}

}  // namespace ms_nsa::twin

extern "C" {
const char *ms_nsa_twin_record() {
  static thread_local std::string copy;
  std::lock_guard<std::mutex> lock(ms_nsa::twin::g_record_mutex);
  copy = ms_nsa::twin::g_record;
  return copy.c_str();
}

void ms_nsa_twin_clear_record() {
  std::lock_guard<std::mutex> lock(ms_nsa::twin::g_record_mutex);
  ms_nsa::twin::g_record.clear();
}
}
