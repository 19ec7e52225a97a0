#include "rotate.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel.hpp"
#include "rng.hpp"
#include "simd.hpp"

namespace fedpress {
namespace {

// The Walsh-Hadamard transform of order L = 2^k is k radix-2 stages; stage h
// (h = 1, 2, 4, ..., L/2) replaces every pair (a, b) = (x[i], x[i+h]), bit h of
// i clear, by (a + b, a - b). The stages commute in exact arithmetic; here
// their order is fixed by L alone, so results do not depend on threads or SIMD
// (no contraction, no reassociation: the clones compute identical values).
//
// Cache blocking: the stages with stride < kSub run on sub-blocks of kSub
// floats (8 KiB, L1-resident), fused with the sign flips; the larger strides
// then sweep the whole block (256 KiB for the default 2^16, L2-resident).
// Up to three stages are fused into one radix-8 sweep: eight rows of h floats
// stay in registers for three stages, so each sweep loads and stores every
// element once. Row pointers are __restrict (rows are disjoint), which is
// what lets GCC vectorise the loops over a row without runtime alias checks.
constexpr std::size_t kSub = 2048;
constexpr std::uint32_t kSignBit = 0x80000000u;

std::size_t pow2_ceil(std::size_t n) {
  std::size_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

std::uint32_t sign_key(std::uint64_t seed) { return static_cast<std::uint32_t>(hash64(seed, 0x524854u)); }

// out[i] = s_{first+i} * x[i] * scale. The sign of global element g is bit
// (g mod 32) of hash32(key, g / 32): one hash per 32 elements. The flip is
// exact. x and out are either the same array or disjoint.
inline void signs_kernel(const float* x, std::size_t len, std::uint32_t key, std::size_t first, float scale,
                         float* out) {
  for (std::size_t i = 0; i < len;) {
    const std::size_t g = first + i;
    const std::uint32_t bit0 = static_cast<std::uint32_t>(g & 31);
    const std::size_t seg = std::min<std::size_t>(len - i, 32 - bit0);
    const std::uint32_t h = hash32(key, static_cast<std::uint32_t>(g >> 5)) >> bit0;
    for (std::size_t j = 0; j < seg; ++j) {
      std::uint32_t u;
      std::memcpy(&u, x + i + j, sizeof u);
      u ^= (h << (31 - j)) & kSignBit;
      float f;
      std::memcpy(&f, &u, sizeof f);
      out[i + j] = f * scale;
    }
    i += seg;
  }
}

// Separate entry points for the two aliasing cases, so that neither needs a
// runtime overlap check (which an in-place call would fail, going scalar).
FEDPRESS_CLONES
void apply_signs(const float* __restrict x, std::size_t len, std::uint32_t key, std::size_t first, float scale,
                 float* __restrict out) {
  signs_kernel(x, len, key, first, scale, out);
}

FEDPRESS_CLONES
void apply_signs_inplace(float* x, std::size_t len, std::uint32_t key, std::size_t first, float scale) {
  signs_kernel(x, len, key, first, scale, x);
}

FEDPRESS_CLONES
void scale_inplace(float* x, std::size_t len, float scale) {
  for (std::size_t i = 0; i < len; ++i) x[i] *= scale;
}

#define FEDPRESS_BUTTERFLY(a, b) \
  do {                           \
    const float t_ = (a);        \
    (a) = t_ + (b);              \
    (b) = t_ - (b);              \
  } while (0)

// Stage h on two disjoint rows of `width` floats, r0 = x and r1 = x + h.
inline void radix2(float* __restrict r0, float* __restrict r1, std::size_t width) {
  for (std::size_t j = 0; j < width; ++j) {
    float v0 = r0[j], v1 = r1[j];
    FEDPRESS_BUTTERFLY(v0, v1);
    r0[j] = v0;
    r1[j] = v1;
  }
}

// Stages h, 2h on four disjoint rows r_k = x + k*h.
inline void radix4(float* __restrict r0, float* __restrict r1, float* __restrict r2, float* __restrict r3,
                   std::size_t width) {
  for (std::size_t j = 0; j < width; ++j) {
    float v0 = r0[j], v1 = r1[j], v2 = r2[j], v3 = r3[j];
    FEDPRESS_BUTTERFLY(v0, v1);
    FEDPRESS_BUTTERFLY(v2, v3);
    FEDPRESS_BUTTERFLY(v0, v2);
    FEDPRESS_BUTTERFLY(v1, v3);
    r0[j] = v0;
    r1[j] = v1;
    r2[j] = v2;
    r3[j] = v3;
  }
}

// Stages h, 2h, 4h on eight disjoint rows r_k = x + k*h.
inline void radix8(float* __restrict r0, float* __restrict r1, float* __restrict r2, float* __restrict r3,
                   float* __restrict r4, float* __restrict r5, float* __restrict r6, float* __restrict r7,
                   std::size_t width) {
  for (std::size_t j = 0; j < width; ++j) {
    float v0 = r0[j], v1 = r1[j], v2 = r2[j], v3 = r3[j], v4 = r4[j], v5 = r5[j], v6 = r6[j], v7 = r7[j];
    FEDPRESS_BUTTERFLY(v0, v1);
    FEDPRESS_BUTTERFLY(v2, v3);
    FEDPRESS_BUTTERFLY(v4, v5);
    FEDPRESS_BUTTERFLY(v6, v7);
    FEDPRESS_BUTTERFLY(v0, v2);
    FEDPRESS_BUTTERFLY(v1, v3);
    FEDPRESS_BUTTERFLY(v4, v6);
    FEDPRESS_BUTTERFLY(v5, v7);
    FEDPRESS_BUTTERFLY(v0, v4);
    FEDPRESS_BUTTERFLY(v1, v5);
    FEDPRESS_BUTTERFLY(v2, v6);
    FEDPRESS_BUTTERFLY(v3, v7);
    r0[j] = v0;
    r1[j] = v1;
    r2[j] = v2;
    r3[j] = v3;
    r4[j] = v4;
    r5[j] = v5;
    r6[j] = v6;
    r7[j] = v7;
  }
}

// Stages 1 and 2 on consecutive quadruples of x[0, len), len a multiple of 4.
inline void stages_1_2(float* x, std::size_t len) {
  for (std::size_t i = 0; i < len; i += 4) {
    float v0 = x[i], v1 = x[i + 1], v2 = x[i + 2], v3 = x[i + 3];
    FEDPRESS_BUTTERFLY(v0, v1);
    FEDPRESS_BUTTERFLY(v2, v3);
    FEDPRESS_BUTTERFLY(v0, v2);
    FEDPRESS_BUTTERFLY(v1, v3);
    x[i] = v0;
    x[i + 1] = v1;
    x[i + 2] = v2;
    x[i + 3] = v3;
  }
}

// Stages 4 and 8 on groups of 16 of x[0, len), len a multiple of 16: radix4
// with four-float rows, unrolled so the compiler sees fixed offsets.
inline void stages_4_8(float* x, std::size_t len) {
  for (std::size_t i = 0; i < len; i += 16)
    for (std::size_t j = 0; j < 4; ++j) {
      float* p = x + i + j;
      float v0 = p[0], v1 = p[4], v2 = p[8], v3 = p[12];
      FEDPRESS_BUTTERFLY(v0, v1);
      FEDPRESS_BUTTERFLY(v2, v3);
      FEDPRESS_BUTTERFLY(v0, v2);
      FEDPRESS_BUTTERFLY(v1, v3);
      p[0] = v0;
      p[4] = v1;
      p[8] = v2;
      p[12] = v3;
    }
}

#undef FEDPRESS_BUTTERFLY

// The stages with strides h, 2h, ... < len of x[0, len) (h >= 16, len and h
// powers of two), three at a time.
FEDPRESS_CLONES
void sweep_stages(float* x, std::size_t len, std::size_t h) {
  while (h < len) {
    if (8 * h <= len) {
      for (std::size_t i = 0; i < len; i += 8 * h) {
        float* p = x + i;
        radix8(p, p + h, p + 2 * h, p + 3 * h, p + 4 * h, p + 5 * h, p + 6 * h, p + 7 * h, h);
      }
      h *= 8;
    } else if (4 * h <= len) {
      for (std::size_t i = 0; i < len; i += 4 * h) {
        float* p = x + i;
        radix4(p, p + h, p + 2 * h, p + 3 * h, h);
      }
      h *= 4;
    } else {
      radix2(x, x + h, h);  // len == 2h
      h *= 2;
    }
  }
}

// All stages of the (unnormalised) transform of x[0, len), len <= kSub.
FEDPRESS_CLONES
void fwht_small(float* x, std::size_t len) {
  if (len < 4) {
    if (len == 2) radix2(x, x + 1, 1);
    return;
  }
  stages_1_2(x, len);
  if (len < 16) {
    if (len == 8) radix2(x, x + 4, 4);
    return;
  }
  stages_4_8(x, len);
  sweep_stages(x, len, 16);
}

using Layout = RhtLayout;

Layout layout(std::size_t n, std::size_t block) {
  Layout l;
  l.block = block;
  l.full = n / block;
  l.tail = n % block;
  l.tail_len = l.tail == 0 ? 0 : pow2_ceil(l.tail);
  return l;
}

// Stages with stride >= kSub of a block of len > kSub floats.
void fwht_large(float* x, std::size_t len) { sweep_stages(x, len, kSub); }

void check_block(std::size_t block) {
  if (!valid_rotate_block(block))
    throw std::invalid_argument("block must be a power of two in [1, 2^24], got " + std::to_string(block));
}

float inv_sqrt(std::size_t len) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(len))); }

// Rotates block b of x (n elements) into w, its len floats.
void forward_block(const Layout& l, std::size_t b, const float* x, std::uint32_t key, float* w) {
  const std::size_t o = l.offset(b), len = l.length(b), valid = l.valid(b);
  const std::size_t sub = std::min(len, kSub);
  const float scale = inv_sqrt(len);
  for (std::size_t s = 0; s < len; s += sub) {
    const std::size_t v = valid > s ? std::min(sub, valid - s) : 0;
    apply_signs(x + o + s, v, key, o + s, scale, w + s);
    std::fill(w + s + v, w + s + sub, 0.0f);
    if (v != 0) fwht_small(w + s, sub);  // an all-padding sub-block stays zero
  }
  if (len > kSub) fwht_large(w, len);
}

// Inverts block b whose rotated values are in w (its len floats, overwritten)
// and writes the block's valid elements to out, which may be w itself. Large
// strides first (the block is in cache after being written), then each
// sub-block's small strides and signs while it is in L1.
void inverse_block(const Layout& l, std::size_t b, float* w, std::uint32_t key, float* out) {
  const std::size_t o = l.offset(b), len = l.length(b), valid = l.valid(b);
  const std::size_t sub = std::min(len, kSub);
  const float scale = inv_sqrt(len);
  if (len > kSub) fwht_large(w, len);
  for (std::size_t s = 0; s < valid; s += sub) {
    fwht_small(w + s, sub);
    if (w == out)
      apply_signs_inplace(w + s, sub, key, o + s, scale);
    else
      apply_signs(w + s, std::min(sub, valid - s), key, o + s, scale, out + s);
  }
}

void check_block_range(const Layout& l, std::size_t first_block, std::size_t end_block) {
  if (first_block > end_block || end_block > l.blocks())
    throw std::invalid_argument("block range [" + std::to_string(first_block) + ", " + std::to_string(end_block) +
                                ") is not within the " + std::to_string(l.blocks()) + " blocks");
}

// The orthonormal transform of one block of len floats, in place: scale first, then the
// stages in rht_forward's order, so that fwht(random_signs(x)) is bit-identical to
// rht_forward(x) (sign flips are exact).
void fwht_block(float* w, std::size_t len) {
  const std::size_t sub = std::min(len, kSub);
  scale_inplace(w, len, inv_sqrt(len));
  for (std::size_t s = 0; s < len; s += sub) fwht_small(w + s, sub);
  if (len > kSub) fwht_large(w, len);
}

// For the in-place block functions: checks a valid block, no padded tail and a valid
// range, then runs fn(w, offset, length, sign key) on each block of the range, w its
// floats in y (y[0] is the first element of block first_block).
template <typename Fn>
void for_each_block(float* y, std::size_t n, std::size_t block, std::uint64_t seed, std::size_t first_block,
                    std::size_t end_block, Fn&& fn) {
  check_block(block);
  const Layout l = layout(n, block);
  if (l.tail != l.tail_len)
    throw std::invalid_argument("length " + std::to_string(n) + " is not whole blocks of " + std::to_string(block) +
                                " and a power-of-two tail");
  check_block_range(l, first_block, end_block);
  const std::uint32_t key = sign_key(seed);
  const std::size_t base = l.offset(first_block);
  for (std::size_t b = first_block; b < end_block; ++b) fn(y + (l.offset(b) - base), l.offset(b), l.length(b), key);
}

}  // namespace

bool valid_rotate_block(std::size_t block) {
  return block >= 1 && block <= kMaxRotateBlock && (block & (block - 1)) == 0;
}

RhtLayout rht_layout(std::size_t n, std::size_t block) {
  check_block(block);
  return layout(n, block);
}

std::size_t rht_padded_size(std::size_t n, std::size_t block) { return rht_layout(n, block).size(); }

void rht_forward(const float* x, std::size_t n, std::size_t block, std::uint64_t seed, float* out) {
  check_block(block);
  const Layout l = layout(n, block);
  const std::uint32_t key = sign_key(seed);
  parallel_for_sized(l.blocks(), n, [&](std::size_t b) { forward_block(l, b, x, key, out + l.offset(b)); });
}

void rht_forward_blocks(const float* x, std::size_t n, std::size_t block, std::uint64_t seed, std::size_t first_block,
                        std::size_t end_block, float* out) {
  check_block(block);
  const Layout l = layout(n, block);
  check_block_range(l, first_block, end_block);
  const std::uint32_t key = sign_key(seed);
  for (std::size_t b = first_block; b < end_block; ++b)
    forward_block(l, b, x, key, out + (l.offset(b) - l.offset(first_block)));
}

void rht_inverse(const float* y, std::size_t m, std::size_t n, std::size_t block, std::uint64_t seed, float* out) {
  check_block(block);
  if (m != rht_padded_size(n, block))
    throw std::invalid_argument("rotated vector has " + std::to_string(m) + " elements, expected " +
                                std::to_string(rht_padded_size(n, block)) + " for n = " + std::to_string(n) +
                                " and block = " + std::to_string(block));
  const Layout l = layout(n, block);
  const std::uint32_t key = sign_key(seed);
  parallel_for_sized(l.blocks(), m, [&](std::size_t b) {
    std::vector<float> scratch;  // only for the one padded tail block
    const std::size_t o = l.offset(b), len = l.length(b);
    float* w = out + o;
    if (l.valid(b) < len) {  // the padded tail does not fit in out
      scratch.resize(len);
      w = scratch.data();
    }
    std::memcpy(w, y + o, len * sizeof(float));
    inverse_block(l, b, w, key, out + o);
  });
}

void rht_inverse_blocks(float* y, std::size_t n, std::size_t block, std::uint64_t seed, std::size_t first_block,
                        std::size_t end_block, float* out) {
  check_block(block);
  const Layout l = layout(n, block);
  check_block_range(l, first_block, end_block);
  const std::uint32_t key = sign_key(seed);
  const std::size_t base = l.offset(first_block);
  for (std::size_t b = first_block; b < end_block; ++b)
    inverse_block(l, b, y + (l.offset(b) - base), key, out + (l.offset(b) - base));
}

void fwht_inplace(float* x, std::size_t len, std::size_t block) {
  check_block(block);
  const Layout l = layout(len, block);
  if (l.tail != l.tail_len)
    throw std::invalid_argument("fwht: length " + std::to_string(len) + " is not whole blocks of " +
                                std::to_string(block) + " and a power-of-two tail (the length of rht's output)");
  parallel_for_sized(l.blocks(), len, [&](std::size_t b) { fwht_block(x + l.offset(b), l.length(b)); });
}

void rht_forward_blocks_inplace(float* y, std::size_t n, std::size_t block, std::uint64_t seed, std::size_t first_block,
                                std::size_t end_block) {
  for_each_block(y, n, block, seed, first_block, end_block,
                 [](float* w, std::size_t o, std::size_t len, std::uint32_t key) {
                   const std::size_t sub = std::min(len, kSub);
                   const float scale = inv_sqrt(len);
                   for (std::size_t s = 0; s < len; s += sub) {  // as forward_block, in place
                     apply_signs_inplace(w + s, sub, key, o + s, scale);
                     fwht_small(w + s, sub);
                   }
                   if (len > kSub) fwht_large(w, len);
                 });
}

void fwht_signs_blocks_inplace(float* y, std::size_t n, std::size_t block, std::uint64_t seed, std::size_t first_block,
                               std::size_t end_block) {
  // fwht_inplace's transform, then the signs: the float rounding of every step is that
  // of the two functions called in turn.
  for_each_block(y, n, block, seed, first_block, end_block,
                 [](float* w, std::size_t o, std::size_t len, std::uint32_t key) {
                   fwht_block(w, len);
                   apply_signs_inplace(w, len, key, o, 1.0f);
                 });
}

void random_signs_inplace(float* x, std::size_t len, std::uint64_t seed) {
  const std::uint32_t key = sign_key(seed);
  // Chunks of whole 32-element sign words; each element's sign depends only on
  // (seed, index), so the split does not matter.
  constexpr std::size_t kChunk = std::size_t{1} << 16;
  parallel_for_sized(ceil_div(len, kChunk), len, [&](std::size_t c) {
    const std::size_t begin = c * kChunk;
    apply_signs_inplace(x + begin, std::min(kChunk, len - begin), key, begin, 1.0f);
  });
}

}  // namespace fedpress
