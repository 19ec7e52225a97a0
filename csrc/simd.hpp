// Run-time selection of instruction-set paths. The build is portable (no
// -march=native); hot loops are compiled several times and picked here.
#pragma once

namespace fedpress {

enum class SimdLevel { scalar = 0, avx2 = 1, avx512 = 2 };

// The best level this CPU supports (and the compiler could build).
SimdLevel detected_simd();
// The level kernels use: detected_simd() capped by FEDPRESS_SIMD
// (scalar|avx2|avx512) or by set_simd_cap().
SimdLevel active_simd();
void set_simd_cap(SimdLevel cap);
const char* simd_name(SimdLevel level);

}  // namespace fedpress

// Multi-versioned functions: GCC/Clang emit one clone per target and an ifunc
// resolver picks the best at load time. Only on ELF x86-64, where ifunc exists.
#if defined(__x86_64__) && defined(__ELF__) && (defined(__GNUC__) || defined(__clang__)) && !defined(FEDPRESS_NO_CLONES)
#define FEDPRESS_HAVE_X86_DISPATCH 1
#define FEDPRESS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FEDPRESS_HAVE_X86_DISPATCH 0
#define FEDPRESS_CLONES
#endif
