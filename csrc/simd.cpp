#include "simd.hpp"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace fedpress {
namespace {

SimdLevel probe() {
#if FEDPRESS_HAVE_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return SimdLevel::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2")) return SimdLevel::avx2;
#endif
  return SimdLevel::scalar;
}

SimdLevel env_cap() {
  const char* env = std::getenv("FEDPRESS_SIMD");
  if (env == nullptr) return SimdLevel::avx512;
  if (std::strcmp(env, "scalar") == 0) return SimdLevel::scalar;
  if (std::strcmp(env, "avx2") == 0) return SimdLevel::avx2;
  return SimdLevel::avx512;
}

std::atomic<int>& cap_setting() {
  static std::atomic<int> cap{static_cast<int>(env_cap())};
  return cap;
}

}  // namespace

SimdLevel detected_simd() {
  static const SimdLevel level = probe();
  return level;
}

SimdLevel active_simd() {
  const int cap = cap_setting().load(std::memory_order_relaxed);
  const int det = static_cast<int>(detected_simd());
  return static_cast<SimdLevel>(cap < det ? cap : det);
}

void set_simd_cap(SimdLevel cap) { cap_setting().store(static_cast<int>(cap), std::memory_order_relaxed); }

const char* simd_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::avx512:
      return "avx512";
    case SimdLevel::avx2:
      return "avx2";
    default:
      return "scalar";
  }
}

}  // namespace fedpress
