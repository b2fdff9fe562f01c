// A standalone copy of the interface MindSpore hands to AOT kernels (mindspore/ccsrc/utils/
// custom_aot_extra.h). The shipped header pulls in MindSpore internals and its generic Attr<T> returns
// T(); this one reproduces the class layout (same virtual functions in the same order, same members),
// which is all the kernel needs to read attributes without linking MindSpore. Build with
// -D_GLIBCXX_USE_CXX11_ABI=0: MindSpore passes std::string with the old ABI.
#ifndef MS_NSA_AOT_EXTRA_H_
#define MS_NSA_AOT_EXTRA_H_

#include <cstdint>
#include <string>
#include <vector>

namespace mindspore {

class AotKernelData {
 public:
  AotKernelData() = default;
  virtual ~AotKernelData() = default;
};

class AotExtra {
 public:
  AotExtra() = default;
  virtual ~AotExtra() = default;
  virtual bool HasAttr(std::string name) = 0;

  void SetWorkSpace(const std::vector<size_t> &workspace) { workspace_ = workspace; }
  const std::vector<size_t> &WorkSpace() const { return workspace_; }
  void SetKernelData(AotKernelData *kernel_data) { kernel_data_ = kernel_data; }
  const AotKernelData *KernelData() const { return kernel_data_; }

  // Public here, private upstream: only their vtable slots matter.
  virtual bool GetAttrBool(std::string name) = 0;
  virtual int64_t GetAttrInt(std::string name) = 0;
  virtual float GetAttrFloat(std::string name) = 0;
  virtual std::string GetAttrStr(std::string name) = 0;
  virtual std::vector<int64_t> GetAttrIntVec(std::string name) = 0;
  virtual std::vector<float> GetAttrFloatVec(std::string name) = 0;
  virtual std::vector<std::vector<int64_t>> GetAttrInt2DVec(std::string name) = 0;
  virtual std::vector<std::vector<float>> GetAttrFloat2DVec(std::string name) = 0;

 private:
  std::vector<size_t> workspace_;
  AotKernelData *kernel_data_{nullptr};
};

}  // namespace mindspore

#endif  // MS_NSA_AOT_EXTRA_H_
