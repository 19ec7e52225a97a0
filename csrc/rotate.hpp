// Seeded randomized Hadamard rotation (RHT), blockwise.
//
// The vector is cut into consecutive blocks of `block` elements (a power of
// two); the last, partial block is zero-padded up to its own next power of two.
// A vector shorter than one block is therefore a single block of
// next_pow2(n) elements. In every block the rotation is
//   y = H_L * D * x_block,   H_L = normalised (orthonormal) Walsh-Hadamard
//                            matrix of order L, entries +-1/sqrt(L),
//   D = diag(s_i), s_i = +-1 a pure function of (seed, global index i).
// The transform is orthonormal, so norms are preserved (up to float rounding)
// and the inverse is x_block = D * H_L * y, with the padding dropped.
//
// Rotating spreads a heavy-tailed vector's energy evenly over its block, which
// makes the coordinates Gaussian-like and much kinder to max-abs quantization.
// Results depend only on the inputs, never on the thread count or SIMD level.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fedpress {

// Largest supported block: 2^24 elements.
constexpr std::size_t kMaxRotateBlock = std::size_t{1} << 24;

// block is a power of two in [1, kMaxRotateBlock].
bool valid_rotate_block(std::size_t block);

// Length m >= n of the rotated vector: n / block full blocks, then the
// remaining n % block elements padded to their next power of two. 0 for n = 0.
std::size_t rht_padded_size(std::size_t n, std::size_t block);

// out: rht_padded_size(n, block) floats. Throws std::invalid_argument for an
// invalid block.
void rht_forward(const float* x, std::size_t n, std::size_t block, std::uint64_t seed, float* out);

// Inverse of rht_forward: y holds m == rht_padded_size(n, block) floats, out n.
// Throws std::invalid_argument for an invalid block or an inconsistent m.
void rht_inverse(const float* y, std::size_t m, std::size_t n, std::size_t block, std::uint64_t seed,
                 float* out);

}  // namespace fedpress
