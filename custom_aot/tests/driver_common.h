// What the sanitizer drivers share: MindSpore's calling convention without MindSpore (an AotExtra
// carrying the attributes, tensors allocated to their exact size), random data, and the tally.
#ifndef MS_NSA_TESTS_DRIVER_COMMON_H_
#define MS_NSA_TESTS_DRIVER_COMMON_H_

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "../aot_extra.h"
#include "../nsa_dtype.h"

extern "C" {
int ms_nsa_last_error_status();
void ms_nsa_clear_error();
}

namespace driver {

class FakeExtra : public mindspore::AotExtra {
 public:
  std::map<std::string, int64_t> ints;
  float scale = 0.125f;
  ~FakeExtra() override { delete KernelData(); }
  bool HasAttr(std::string name) override { return ints.count(name) > 0 || name == "scale_value"; }
  bool GetAttrBool(std::string) override { return false; }
  int64_t GetAttrInt(std::string name) override { return ints.at(name); }
  float GetAttrFloat(std::string) override { return scale; }
  std::string GetAttrStr(std::string) override { return "TND"; }
  std::vector<int64_t> GetAttrIntVec(std::string) override { return {}; }
  std::vector<float> GetAttrFloatVec(std::string) override { return {}; }
  std::vector<std::vector<int64_t>> GetAttrInt2DVec(std::string) override { return {}; }
  std::vector<std::vector<float>> GetAttrFloat2DVec(std::string) override { return {}; }
};

// A tensor owning exactly the bytes its shape needs.
struct Buffer {
  std::vector<int64_t> shape;
  std::string dtype;
  std::vector<unsigned char> bytes;
  Buffer(std::vector<int64_t> s, std::string d) : shape(std::move(s)), dtype(std::move(d)) {
    int64_t n = 1;
    for (int64_t v : shape) n *= v;
    bytes.assign(static_cast<size_t>(n) * element_size(), 0);
  }
  size_t element_size() const {
    if (dtype == "float32" || dtype == "int32") return 4;
    if (dtype == "int64") return 8;
    if (dtype == "bool" || dtype == "uint8") return 1;
    return 2;
  }
  int64_t count() const { return static_cast<int64_t>(bytes.size() / element_size()); }
  template <typename T> T *as() { return reinterpret_cast<T *>(bytes.data()); }
};

inline std::mt19937_64 rng(1234);

inline void fill_random(Buffer &b) {
  std::normal_distribution<float> normal;
  for (int64_t i = 0; i < b.count(); ++i) {
    const float x = normal(rng);
    if (b.dtype == "float32") b.as<float>()[i] = x;
    else ms_nsa::store_row(b.dtype == "float16" ? ms_nsa::DType::kFloat16 : ms_nsa::DType::kBFloat16,
                           &x, b.bytes.data(), i, 1);
  }
}

using InitFn = int (*)(int *, int64_t **, const char **, mindspore::AotExtra *);
using KernelFn = int (*)(int, void **, int *, int64_t **, const char **, void *, void *);

// With MS_NSA_DUMP_DIR set, every call that succeeds leaves its tensors there (the inputs and the
// outputs it wrote), for tests/test_aarch64.py to check against the float64 reference on the host:
// case_<n>.txt names the entry point, its attributes and each tensor's dtype and shape, in call order;
// case_<n>_<i>.bin holds tensor i's bytes (little-endian, as on every architecture tested).
inline void dump_call(const char *entry, const std::vector<Buffer *> &tensors,
                      const std::map<std::string, int64_t> &ints, float scale) {
  static int dumped = 0;
  const char *dir = std::getenv("MS_NSA_DUMP_DIR");
  if (!dir) return;
  const std::string stem = std::string(dir) + "/case_" + std::to_string(dumped++);
  FILE *manifest = std::fopen((stem + ".txt").c_str(), "w");
  if (!manifest) throw std::runtime_error("cannot write to MS_NSA_DUMP_DIR " + std::string(dir));
  std::fprintf(manifest, "entry %s\nfloat scale_value %.9g\n", entry, static_cast<double>(scale));
  for (const auto &[name, value] : ints) std::fprintf(manifest, "int %s %lld\n", name.c_str(), static_cast<long long>(value));
  for (size_t i = 0; i < tensors.size(); ++i) {
    std::fprintf(manifest, "tensor %s", tensors[i]->dtype.c_str());
    for (int64_t d : tensors[i]->shape) std::fprintf(manifest, " %lld", static_cast<long long>(d));
    std::fprintf(manifest, "\n");
    FILE *data = std::fopen((stem + "_" + std::to_string(i) + ".bin").c_str(), "wb");
    if (!data) throw std::runtime_error("cannot write to MS_NSA_DUMP_DIR " + std::string(dir));
    std::fwrite(tensors[i]->bytes.data(), 1, tensors[i]->bytes.size(), data);
    std::fclose(data);
  }
  std::fclose(manifest);
}

// Calls an entry point MindSpore-style; returns the status (0 = ok), catching the thrown error.
inline int call_entry(const char *entry, InitFn init, KernelFn kernel, const std::vector<Buffer *> &tensors,
                      const std::map<std::string, int64_t> &ints) {
  std::vector<void *> params;
  std::vector<int> ndims;
  std::vector<int64_t *> shapes;
  std::vector<const char *> dtypes;
  for (Buffer *t : tensors) {
    params.push_back(t->bytes.data());
    ndims.push_back(static_cast<int>(t->shape.size()));
    shapes.push_back(t->shape.data());
    dtypes.push_back(t->dtype.c_str());
  }
  FakeExtra extra;
  extra.ints = ints;
  init(ndims.data(), shapes.data(), dtypes.data(), &extra);
  ms_nsa_clear_error();
  int status;
  try {
    status = kernel(static_cast<int>(params.size()), params.data(), ndims.data(), shapes.data(), dtypes.data(),
                    nullptr, &extra);
  } catch (const std::invalid_argument &) {
    status = ms_nsa_last_error_status();
  }
  if (status == 0) dump_call(entry, tensors, ints, extra.scale);
  return status;
}

inline int failures = 0, valid_runs = 0, invalid_runs = 0;

inline void expect(bool ok, const std::string &what) {
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

inline bool all_finite(const Buffer &b) {
  for (int64_t i = 0; i < b.count(); ++i) {
    float x;
    if (b.dtype == "float32") x = reinterpret_cast<const float *>(b.bytes.data())[i];
    else ms_nsa::load_row(b.dtype == "float16" ? ms_nsa::DType::kFloat16 : ms_nsa::DType::kBFloat16,
                          b.bytes.data(), i, &x, 1);
    if (!std::isfinite(x)) return false;
  }
  return true;
}

}  // namespace driver

#endif  // MS_NSA_TESTS_DRIVER_COMMON_H_
