// Compact coding of strictly ascending indices in [0, n).
//
// Stream layout (all of it; a caller frames it):
//   count   LEB128 varint   number of indices k (k <= n)
//   m       LEB128 varint   Golomb parameter, 1 <= m <= max(1, n)   (absent when k == 0)
//   bits    ceil(B/8) bytes the Golomb codes of the k gaps, B bits in all, packed
//                           least significant bit first; unused bits of the last
//                           byte are zero
// Gap g_i = idx_i - idx_{i-1} - 1 (g_0 = idx_0). Each gap is q = g / m written in
// unary as q zero bits and a one bit, then r = g % m in truncated binary: with
// b = ceil(log2 m) and u = 2^b - m, r < u is written as b-1 bits; otherwise
// v = r + u is written as its top b-1 bits (v >> 1) followed by its low bit.
// A Golomb code is optimal for geometric gaps, which is what uniformly spread
// indices produce, so this lands within about 1% of log2(C(n,k))/k bits per
// index; m is chosen by the exact coded size among candidates around the
// geometric optimum.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "errors.hpp"

namespace fedpress {

// The gaps g_0 = idx_0, g_i = idx_i - idx_{i-1} - 1 of both versions' streams. Throws
// std::invalid_argument if indices are not strictly ascending or >= n, or k > n.
std::vector<std::uint32_t> index_gaps(const std::uint32_t* indices, std::size_t k, std::uint64_t n);

// std::invalid_argument naming position i of indices, which is >= n or not above the one
// before it.
[[noreturn]] void throw_bad_index(const std::uint32_t* indices, std::size_t i, std::uint64_t n);

// Gap i of ascending indices (g_0 = idx_0, g_i = idx_i - idx_{i-1} - 1), idx_i checked
// first (throw_bad_index). Inline: the encoders call it once per index.
inline std::uint32_t checked_gap(const std::uint32_t* indices, std::size_t i, std::uint64_t n) {
  if (indices[i] >= n || (i > 0 && indices[i] <= indices[i - 1])) throw_bad_index(indices, i, n);
  return i == 0 ? indices[0] : indices[i] - indices[i - 1] - 1;  // fits 32 bits: idx < n <= 2^32
}

// Throws std::invalid_argument if indices are not strictly ascending or >= n.
std::vector<std::uint8_t> encode_indices(const std::uint32_t* indices, std::size_t k, std::uint64_t n);

// Decodes a whole stream; everything must be consumed. Throws MalformedData (errors.hpp,
// the message naming the field) on a malformed stream, before allocating when the
// count exceeds n, max_count or what the buffer can hold.
std::vector<std::uint32_t> decode_indices(const std::uint8_t* data, std::size_t size, std::uint64_t n,
                                          std::uint64_t max_count);

// The same into out, which holds exactly `count` indices: a stream of any other count is
// malformed. For a caller that decodes many streams into one buffer it allocated once.
void decode_indices_into(const std::uint8_t* data, std::size_t size, std::uint64_t n, std::uint32_t* out,
                         std::size_t count);

}  // namespace fedpress
