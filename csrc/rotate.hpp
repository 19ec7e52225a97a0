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

// The blocks of a vector of n elements. A vector shorter than `block` is a
// single tail block of next_pow2(n), i.e. the effective block is
// min(block, next_pow2(n)). Block b starts at b * block of the rotated vector.
struct RhtLayout {
  std::size_t block;     // length of a full block
  std::size_t full;      // number of full blocks
  std::size_t tail;      // elements of the last, partial block (0: none)
  std::size_t tail_len;  // its padded length (a power of two; 0: none)
  std::size_t blocks() const { return full + (tail != 0); }
  std::size_t size() const { return full * block + tail_len; }  // rht_padded_size
  std::size_t offset(std::size_t b) const { return b * block; }
  std::size_t length(std::size_t b) const { return b < full ? block : tail_len; }
  std::size_t valid(std::size_t b) const { return b < full ? block : tail; }
};

// Throws std::invalid_argument for an invalid block.
RhtLayout rht_layout(std::size_t n, std::size_t block);

// Length m >= n of the rotated vector: n / block full blocks, then the
// remaining n % block elements padded to their next power of two. 0 for n = 0.
std::size_t rht_padded_size(std::size_t n, std::size_t block);

// out: rht_padded_size(n, block) floats. Throws std::invalid_argument for an
// invalid block.
void rht_forward(const float* x, std::size_t n, std::size_t block, std::uint64_t seed, float* out);

// Inverse of rht_forward: y holds m == rht_padded_size(n, block) floats, out n.
// Throws std::invalid_argument for an invalid block or an inconsistent m.
void rht_inverse(const float* y, std::size_t m, std::size_t n, std::size_t block, std::uint64_t seed, float* out);

// The two halves of the rotation, exposed on their own. fwht_inplace applies
// the orthonormal Walsh-Hadamard transform H_L (entries +-1/sqrt(L)) to each
// block of x, the blocks being those of rht_forward's output: len is whole
// blocks of `block`, then possibly one shorter power-of-two tail block (so a
// power of two below `block` is one block). random_signs_inplace multiplies
// x_i by s_i, the signs rht_forward uses for seed. For a zero-padded x of
// length rht_padded_size(n, block),
//   fwht_inplace(random_signs_inplace(x)) == rht_forward(x)   value for value,
// and fwht_inplace is its own inverse up to float rounding. Throws
// std::invalid_argument for an invalid block or length.
void fwht_inplace(float* x, std::size_t len, std::size_t block);
void random_signs_inplace(float* x, std::size_t len, std::uint64_t seed);

// Block ranges, for kernels that rotate a cache-sized piece at a time. Blocks
// are numbered as in rht_forward (the padded tail last). rht_forward_blocks
// writes the rotated blocks [first_block, end_block) of x (n elements) to out,
// which receives their padded lengths; rht_inverse_blocks inverts them from y
// (those rotated values, used as workspace and overwritten) into out, which
// receives their unpadded elements. Both equal the whole-vector functions on
// those elements, bit for bit.
void rht_forward_blocks(const float* x, std::size_t n, std::size_t block, std::uint64_t seed, std::size_t first_block,
                        std::size_t end_block, float* out);
void rht_inverse_blocks(float* y, std::size_t n, std::size_t block, std::uint64_t seed, std::size_t first_block,
                        std::size_t end_block, float* out);

// In place on blocks that need no padding (n is whole blocks and a power-of-two
// tail): y holds blocks [first_block, end_block) of an n-element vector, y[0]
// the first element of block first_block. rht_forward_blocks_inplace applies
// y = H D y per block (D's signs indexed as in rht_forward), bit-identical to
// random_signs_inplace then fwht_inplace over those blocks; fwht_signs_blocks_inplace
// applies y = D H y in the order of fwht_inplace then random_signs_inplace, bit
// for bit. EDEN's rotation (eden.hpp) is two of the first, undone by two of the
// second. Both throw std::invalid_argument for an invalid block, a padded n or
// a bad range.
void rht_forward_blocks_inplace(float* y, std::size_t n, std::size_t block, std::uint64_t seed, std::size_t first_block,
                                std::size_t end_block);
void fwht_signs_blocks_inplace(float* y, std::size_t n, std::size_t block, std::uint64_t seed, std::size_t first_block,
                               std::size_t end_block);

}  // namespace fedpress
