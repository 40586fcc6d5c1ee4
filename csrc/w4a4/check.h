// Argument checks of the W4A4 ops, and message formatting for them. Numbers and shapes are
// turned into strings with std::to_string instead of being streamed: on the device image,
// streaming an integer into TORCH_CHECK's message from this extension crashed the process
// (segfault inside the error path; enum and string messages worked), so the messages avoid
// ostream number formatting.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <tuple>

namespace nunchaku {

inline std::string num(int64_t v) { return std::to_string(v); }

// act_scales [K/64, M_pad]: the token count is padded to a multiple of this, written by the
// quantizer (zeros) and read by both GEMMs; a multiple of the sm_90 GEMM's two token tiles (128,
// 192), whose producer bulk-copies the scales of whole tiles.
constexpr int64_t kScaleRowPad = 384;
inline int64_t scale_rows_padded(int64_t m) { return (m + kScaleRowPad - 1) / kScaleRowPad * kScaleRowPad; }

inline std::string shape(c10::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(a[i]);
  }
  return s + "]";
}

// t must be a contiguous, 16-byte aligned `dtype` tensor of shape `expected` on `dev`.
inline void check_operand(const char* op, const at::Tensor& t, const char* name, const at::Device& dev,
                          at::ScalarType dtype, std::initializer_list<int64_t> expected) {
  TORCH_CHECK(t.device() == dev, op, ": ", name, " must be on ", dev.str(), ", got ", t.device().str());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes().equals(expected), op, ": ", name, " must have shape ", shape(expected), ", got ",
              shape(t.sizes()));
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ", name, " must be 16-byte aligned");
}

// The GEMM epilogue's GELU starts at an even column (it handles columns in pairs); N means none.
inline void check_gelu_from(const char* op, int64_t gelu_from, int64_t N) {
  TORCH_CHECK(gelu_from >= 0 && gelu_from <= N && gelu_from % 2 == 0, op, ": gelu_from = ", num(gelu_from),
              " must be an even column index in [0, N = ", num(N), "]");
}

// The kernels of one op are built for one architecture family; the library also carries them
// (as empty bodies) for the others, so the device is checked before any launch.
struct DeviceInfo {
  int cc;   // compute capability, 10 * major + minor
  int sms;  // multiprocessor count
  int max_smem_per_block;  // opt-in dynamic shared memory limit of one CTA, bytes
};

// Queried once per device: the ops consult it on every call.
inline DeviceInfo device_info(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceInfo> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  int major = 0, minor = 0, sms = 0, smem = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return cache[device] = DeviceInfo{10 * major + minor, sms, smem};
}

inline void check_device_arch(const char* op, const at::Device& dev, int min_cc, int max_cc, const char* needs) {
  const int cc = device_info(dev.index()).cc;
  TORCH_CHECK(cc >= min_cc && cc <= max_cc, op, ": needs ", needs, ", but ", dev.str(), " is sm_", num(cc));
}

// Opts `kernel` into `bytes` of dynamic shared memory on the current device. The attribute is
// per device, so a process-wide once-flag would leave a second GPU at the 48 KB default.
inline void allow_dynamic_smem(const void* kernel, int bytes) {
  // The attribute is a ceiling: raise it only (a launch needing less still fits), so that calls
  // with different sizes (the pow2 quantizer's size depends on K) never lower it under a size
  // an earlier call set and remembered.
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> ceiling;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  int& set = ceiling[{kernel, device}];
  if (bytes <= set) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  set = bytes;
}

}  // namespace nunchaku
