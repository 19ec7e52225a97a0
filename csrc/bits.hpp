// Bit counting on 64-bit words, portable: the compiler's builtin (one instruction) with
// GCC and Clang, a loop elsewhere.
#pragma once

#include <cstdint>

namespace fedpress {

// Trailing zero bits of w, which must not be 0.
inline unsigned ctz64(std::uint64_t w) {
#if defined(__GNUC__) || defined(__clang__)
  return static_cast<unsigned>(__builtin_ctzll(w));
#else
  unsigned z = 0;
  for (; !(w & 1); w >>= 1) ++z;
  return z;
#endif
}

// Set bits of w.
inline unsigned popcount64(std::uint64_t w) {
#if defined(__GNUC__) || defined(__clang__)
  return static_cast<unsigned>(__builtin_popcountll(w));
#else
  unsigned c = 0;
  for (; w; w &= w - 1) ++c;
  return c;
#endif
}

}  // namespace fedpress
