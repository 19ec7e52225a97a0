// Counter-based random numbers: the value for position i under seed s is a pure
// function of (s, i). Any thread can produce any element's random number, so
// results never depend on how the work was split.
#pragma once

#include <cstdint>

namespace fedpress {

// 64-bit finaliser of SplitMix64 applied to seed and counter; passes BigCrush
// as a counter-mode generator when the key is mixed in first.
inline std::uint64_t hash64(std::uint64_t seed, std::uint64_t counter) {
  std::uint64_t z = seed * 0x9E3779B97F4A7C15ULL + counter * 0xD1B54A32D192ED03ULL + 0x632BE59BD9B4E019ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// 32-bit counter hash: Wellons' "lowbias32" mixer (two multiplies, avalanche
// bias ~0.17%) over counter ^ key. Cheap enough to vectorise with 32-bit lane
// multiplies; each result feeds two quantized elements (16 bits each).
inline std::uint32_t hash32(std::uint32_t key, std::uint32_t counter) {
  std::uint32_t x = counter ^ key;
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// The seed of one random choice of a payload (docs/format.md, "Seeds"): SplitMix64
// over (seed, ordinal, purpose), the same function as fedpress.format's stage_seed.
// Purposes: what the derived seed drives.
constexpr std::uint64_t kPurposeRandk = 1, kPurposeRotation = 2, kPurposeQuantize = 3;
inline std::uint64_t stage_seed(std::uint64_t seed, std::uint64_t ordinal, std::uint64_t purpose) {
  std::uint64_t z = seed + 0x9E3779B97F4A7C15ULL * (ordinal * 4 + purpose + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// The high 64 bits of the 128-bit product a * b.
inline std::uint64_t mulhi64(std::uint64_t a, std::uint64_t b) {
#if defined(__SIZEOF_INT128__)
  return static_cast<std::uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#else  // no 128-bit integers (MSVC): the high half of the product from 32-bit halves
  const std::uint64_t a_lo = a & 0xFFFFFFFFu, a_hi = a >> 32;
  const std::uint64_t b_lo = b & 0xFFFFFFFFu, b_hi = b >> 32;
  const std::uint64_t lo_lo = a_lo * b_lo, hi_lo = a_hi * b_lo, lo_hi = a_lo * b_hi, hi_hi = a_hi * b_hi;
  const std::uint64_t cross = (lo_lo >> 32) + (hi_lo & 0xFFFFFFFFu) + lo_hi;
  return hi_hi + (hi_lo >> 32) + (cross >> 32);
#endif
}

// Uniform in [0, bound) from 64 random bits (Lemire's multiply-shift); bias is
// below bound / 2^64.
inline std::uint64_t bounded64(std::uint64_t random_bits, std::uint64_t bound) { return mulhi64(random_bits, bound); }

}  // namespace fedpress
