#include "intcode.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.hpp"
#include "eden.hpp"
#include "errors.hpp"
#include "parallel.hpp"
#include "rng.hpp"
#include "simd.hpp"

namespace fedpress {
namespace {

// Codes per task: a multiple of 8, so a task's packed codes start and end on whole
// bytes whatever the width, and tasks never share a byte.
constexpr std::size_t kChunk = std::size_t{1} << 16;

std::size_t packed_bytes(std::size_t n, int width) {
  return (n / 8) * static_cast<std::size_t>(width) + ((n % 8) * static_cast<std::size_t>(width) + 7) / 8;
}

void check_width(int width) {
  // 7 pending bits and a code fit one 64-bit accumulator.
  if (width < 1 || width > kMaxWidth)
    throw std::invalid_argument("width must be in [1, 56], got " + std::to_string(width));
}

}  // namespace

namespace {

void check_levels(int bits, float clip) {
  if (bits < 1 || bits > 16) throw std::invalid_argument("bits must be in [1, 16], got " + std::to_string(bits));
  if (!(std::isfinite(clip) && clip > 0.0f))
    throw std::invalid_argument("clip must be finite and positive, got " + std::to_string(clip));
}

// int_encode_part without the checks; whether x held a NaN.
bool encode_levels(const float* x, std::size_t first, std::size_t n, int bits, float clip, std::uint64_t seed,
                   std::uint64_t* codes) {
  const double c = clip, top = static_cast<double>((std::uint64_t{1} << bits) - 1);
  const double per_unit = top / (2.0 * c);  // levels per unit of x
  bool found = false;
  for (std::size_t i = 0; i < n; ++i) {
    const double v = x[i];
    found |= v != v;
    const double t = (std::min(std::max(v, -c), c) + c) * per_unit;
    const double u = static_cast<double>(hash64(seed, first + i) >> 11) * 0x1p-53;
    // t + u < top + 1 in exact arithmetic; the cap absorbs rounding at the top.
    codes[i] = static_cast<std::uint64_t>(std::min(std::floor(t + u), top));
  }
  return found;
}

}  // namespace

void int_encode(const float* x, std::size_t n, int bits, float clip, std::uint64_t seed, std::uint64_t* codes) {
  check_levels(bits, clip);
  std::atomic<bool> nan{false};
  parallel_for_sized(ceil_div(n, kChunk), n, [&](std::size_t task) {
    const std::size_t begin = task * kChunk, end = std::min(n, begin + kChunk);
    if (encode_levels(x + begin, begin, end - begin, bits, clip, seed, codes + begin))
      nan.store(true, std::memory_order_relaxed);
  });
  if (nan.load()) throw std::invalid_argument("values hold NaN");
}

void int_encode_part(const float* x, std::size_t first, std::size_t n, int bits, float clip, std::uint64_t seed,
                     std::uint64_t* codes) {
  check_levels(bits, clip);
  if (encode_levels(x, first, n, bits, clip, seed, codes)) throw std::invalid_argument("values hold NaN");
}

void int_encode_rotated(const float* x, std::size_t n, int bits, float clip, std::uint64_t seed, std::size_t block,
                        std::uint64_t rotation_seed, std::uint64_t* codes) {
  check_levels(bits, clip);  // before any range: a bad argument is refused with nothing written
  eden_rotated_ranges(x, n, block, rotation_seed, [&](std::size_t first, const float* rotated, std::size_t count) {
    const SerialScope serial;  // one range per task
    int_encode_part(rotated, first, count, bits, clip, seed, codes + first);
  });
}

void pack_codes(const std::uint64_t* codes, std::size_t n, int width, std::uint8_t* out) {
  check_width(width);
  const std::uint64_t limit_mask = ~std::uint64_t{0} << width;
  std::atomic<bool> too_wide{false};
  parallel_for_sized(ceil_div(n, kChunk), n, [&](std::size_t task) {
    const std::size_t begin = task * kChunk, end = std::min(n, begin + kChunk);
    std::uint8_t* o = out + packed_bytes(begin, width);
    std::uint64_t acc = 0;
    int pending = 0;
    bool wide = false;
    for (std::size_t i = begin; i < end; ++i) {
      wide |= (codes[i] & limit_mask) != 0;
      acc |= codes[i] << pending;
      pending += width;
      while (pending >= 8) {
        *o++ = static_cast<std::uint8_t>(acc);
        acc >>= 8;
        pending -= 8;
      }
    }
    if (pending > 0) *o = static_cast<std::uint8_t>(acc);  // the last task's padding bits are zero
    if (wide) too_wide.store(true, std::memory_order_relaxed);
  });
  if (too_wide.load()) throw std::invalid_argument("a code does not fit in " + std::to_string(width) + " bits");
}

namespace {

// Codes [begin, end) of a packed run (begin a multiple of kChunk: on a byte), fn(i, code)
// for each in turn.
template <typename Fn>
void unpack_range(const std::uint8_t* in, std::size_t begin, std::size_t end, int width, Fn&& fn) {
  const std::uint64_t mask = (std::uint64_t{1} << width) - 1;
  const std::uint8_t* p = in + packed_bytes(begin, width);
  std::uint64_t acc = 0;
  int have = 0;
  for (std::size_t i = begin; i < end; ++i) {
    while (have < width) {
      acc |= static_cast<std::uint64_t>(*p++) << have;
      have += 8;
    }
    fn(i, acc & mask);
    acc >>= width;
    have -= width;
  }
}

void check_padding(const std::uint8_t* in, std::size_t n, int width) {
  const std::size_t tail_bits = (n * static_cast<std::size_t>(width)) % 8;
  if (tail_bits != 0 && (in[packed_bytes(n, width) - 1] >> tail_bits) != 0)
    throw MalformedData("int section: nonzero padding bits in the last byte");
}

}  // namespace

void unpack_codes(const std::uint8_t* in, std::size_t n, int width, std::uint64_t* codes) {
  check_width(width);
  parallel_for_sized(ceil_div(n, kChunk), n, [&](std::size_t task) {
    const std::size_t begin = task * kChunk;
    unpack_range(in, begin, std::min(n, begin + kChunk), width, [&](std::size_t i, std::uint64_t c) { codes[i] = c; });
  });
  check_padding(in, n, width);
}

namespace {

// float((t * step - offset) * weight) of each code, t the code as a signed integer (a
// residue modulo 2^m read as negative from 2^m - 2^(m-2) up, with m > 0).
struct Levels {
  std::uint64_t modulus, negative_from;
  double step, offset, weight;

  Levels(int modulus_bits, double step_, double offset_, double weight_)
      : modulus(modulus_bits ? std::uint64_t{1} << modulus_bits : 0),
        negative_from(modulus_bits >= 2 ? modulus - (modulus >> 2) : ~std::uint64_t{0}),
        step(step_),
        offset(offset_),
        weight(weight_) {
    if (modulus_bits < 0 || modulus_bits > 62) throw std::invalid_argument("modulus_bits must be in [0, 62]");
  }
};

// The loops below run in every clone (no FMA contraction anywhere: -ffp-contract=off), so
// each clone gives the same bits; AVX-512's clone converts eight int64 to double at once.
inline float level_value(std::uint64_t c, std::uint64_t modulus, std::uint64_t negative_from, double step,
                         double offset, double weight) {
  const std::int64_t t = c >= negative_from ? static_cast<std::int64_t>(c) - static_cast<std::int64_t>(modulus)
                                            : static_cast<std::int64_t>(c);
  const double level = static_cast<double>(t) * step;  // numpy's steps, one rounding each
  return static_cast<float>((level - offset) * weight);
}

FEDPRESS_CLONES
void values_of_u16(const std::uint8_t* codes, std::size_t n, const Levels& l, float* out) {
  const std::uint64_t modulus = l.modulus, negative_from = l.negative_from;
  const double step = l.step, offset = l.offset, weight = l.weight;
  for (std::size_t i = 0; i < n; ++i) {
    std::uint16_t c;
    std::memcpy(&c, codes + 2 * i, 2);  // little-endian hosts
    out[i] = level_value(c, modulus, negative_from, step, offset, weight);
  }
}

FEDPRESS_CLONES
void values_of_u64(const std::uint64_t* codes, std::size_t n, const Levels& l, float* out) {
  const std::uint64_t modulus = l.modulus, negative_from = l.negative_from;
  const double step = l.step, offset = l.offset, weight = l.weight;
  for (std::size_t i = 0; i < n; ++i) out[i] = level_value(codes[i], modulus, negative_from, step, offset, weight);
}

// Widths up to 8: the level of every possible code, from the table of them (level_value's,
// so the same bits), each group of eight codes read in one load of its W bytes. 25.6M codes:
// the bit stream walked code by code took 27 ms for int4; converting each byte, 14 ms for int8.
template <int W>
void values_of_narrow(const std::uint8_t* in, std::size_t begin, std::size_t end, const float* table, float* out) {
  constexpr std::uint64_t kMask = (std::uint64_t{1} << W) - 1;
  std::size_t i = begin;  // a multiple of 8: group i / 8 starts on byte W * i / 8
  const std::uint8_t* p = in + begin / 8 * W;
  for (; i + 8 <= end; i += 8, p += W) {
    std::uint64_t bits = 0;
    std::memcpy(&bits, p, W);  // little-endian hosts
    for (int j = 0; j < 8; ++j) out[i + j] = table[(bits >> (j * W)) & kMask];
  }
  if (i < end) {  // the last codes, from the bytes that hold them
    std::uint64_t bits = 0;
    std::memcpy(&bits, p, ((end - i) * W + 7) / 8);
    for (std::size_t j = 0; i + j < end; ++j) out[i + j] = table[(bits >> (j * W)) & kMask];
  }
}

void values_of_narrow_any(const std::uint8_t* in, std::size_t begin, std::size_t end, int width, const float* table,
                          float* out) {
  with_constant<1, 2, 3, 4, 5, 6, 7, 8>(static_cast<unsigned>(width), [&](auto w) {
    values_of_narrow<static_cast<int>(decltype(w)::value)>(in, begin, end, table, out);
  });
}

}  // namespace

void int_values(const std::uint8_t* in, std::size_t n, int width, int modulus_bits, double step, double offset,
                double weight, float* out) {
  check_width(width);
  const Levels levels(modulus_bits, step, offset, weight);
  check_padding(in, n, width);
  std::vector<float> table;
  if (width <= 8) {
    table.resize(std::size_t{1} << width);
    for (std::size_t c = 0; c < table.size(); ++c)
      table[c] = level_value(c, levels.modulus, levels.negative_from, levels.step, levels.offset, levels.weight);
  }
  // Chunks from the last to the first: a fresh output is first touched at the top of each
  // huge page, which Linux zeroes last (see crc32c_with_jobs).
  const std::size_t chunks = ceil_div(n, kChunk);
  parallel_for_sized(chunks, n, [&](std::size_t task) {
    const std::size_t begin = (chunks - 1 - task) * kChunk, end = std::min(n, begin + kChunk);
    if (width <= 8) {
      values_of_narrow_any(in, begin, end, width, table.data(), out);
    } else if (width == 16) {
      values_of_u16(in + 2 * begin, end - begin, levels, out + begin);
    } else {
      thread_local std::vector<std::uint64_t> codes;
      codes.resize(end - begin);
      unpack_range(in, begin, end, width, [&](std::size_t i, std::uint64_t c) { codes[i - begin] = c; });
      values_of_u64(codes.data(), end - begin, levels, out + begin);
    }
  });
}

void int_values_of(const std::uint64_t* codes, std::size_t n, int modulus_bits, double step, double offset,
                   double weight, float* out) {
  const Levels levels(modulus_bits, step, offset, weight);
  const std::size_t chunks = ceil_div(n, kChunk);  // from the last, as int_values
  parallel_for_sized(chunks, n, [&](std::size_t task) {
    const std::size_t begin = (chunks - 1 - task) * kChunk, end = std::min(n, begin + kChunk);
    values_of_u64(codes + begin, end - begin, levels, out + begin);
  });
}

}  // namespace fedpress
