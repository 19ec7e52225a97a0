#include "intcode.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "errors.hpp"
#include "parallel.hpp"
#include "rng.hpp"

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

void int_encode(const float* x, std::size_t n, int bits, float clip, std::uint64_t seed, std::uint64_t* codes) {
  if (bits < 1 || bits > 16) throw std::invalid_argument("bits must be in [1, 16], got " + std::to_string(bits));
  if (!(std::isfinite(clip) && clip > 0.0f))
    throw std::invalid_argument("clip must be finite and positive, got " + std::to_string(clip));
  const double c = clip, top = static_cast<double>((std::uint64_t{1} << bits) - 1);
  const double per_unit = top / (2.0 * c);  // levels per unit of x
  std::atomic<bool> nan{false};
  parallel_for_sized(ceil_div(n, kChunk), n, [&](std::size_t task) {
    const std::size_t end = std::min(n, (task + 1) * kChunk);
    bool found = false;
    for (std::size_t i = task * kChunk; i < end; ++i) {
      const double v = x[i];
      found |= v != v;
      const double t = (std::min(std::max(v, -c), c) + c) * per_unit;
      const double u = static_cast<double>(hash64(seed, i) >> 11) * 0x1p-53;
      // t + u < top + 1 in exact arithmetic; the cap absorbs rounding at the top.
      codes[i] = static_cast<std::uint64_t>(std::min(std::floor(t + u), top));
    }
    if (found) nan.store(true, std::memory_order_relaxed);
  });
  if (nan.load()) throw std::invalid_argument("values hold NaN");
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
  if (too_wide.load())
    throw std::invalid_argument("a code does not fit in " + std::to_string(width) + " bits");
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
class LevelValue {
 public:
  LevelValue(int modulus_bits, double step, double offset, double weight)
      : modulus_(modulus_bits ? std::uint64_t{1} << modulus_bits : 0),
        negative_from_(modulus_bits >= 2 ? modulus_ - (modulus_ >> 2) : ~std::uint64_t{0}),
        step_(step),
        offset_(offset),
        weight_(weight) {
    if (modulus_bits < 0 || modulus_bits > 62) throw std::invalid_argument("modulus_bits must be in [0, 62]");
  }
  float operator()(std::uint64_t c) const {
    const std::int64_t t = c >= negative_from_ ? static_cast<std::int64_t>(c) - static_cast<std::int64_t>(modulus_)
                                               : static_cast<std::int64_t>(c);
    const double level = static_cast<double>(t) * step_;  // numpy's steps, one rounding each
    return static_cast<float>((level - offset_) * weight_);
  }

 private:
  std::uint64_t modulus_, negative_from_;
  double step_, offset_, weight_;
};

}  // namespace

void int_values(const std::uint8_t* in, std::size_t n, int width, int modulus_bits, double step, double offset,
                double weight, float* out) {
  check_width(width);
  const LevelValue value(modulus_bits, step, offset, weight);
  check_padding(in, n, width);
  parallel_for_sized(ceil_div(n, kChunk), n, [&](std::size_t task) {
    const std::size_t begin = task * kChunk, end = std::min(n, begin + kChunk);
    if (width == 8) {  // int8's codes: a byte each, no bit stream to follow
      for (std::size_t i = begin; i < end; ++i) out[i] = value(in[i]);
    } else if (width == 16) {
      for (std::size_t i = begin; i < end; ++i) {
        std::uint16_t c;
        std::memcpy(&c, in + 2 * i, 2);  // little-endian hosts
        out[i] = value(c);
      }
    } else {
      unpack_range(in, begin, end, width, [&](std::size_t i, std::uint64_t c) { out[i] = value(c); });
    }
  });
}

void int_values_of(const std::uint64_t* codes, std::size_t n, int modulus_bits, double step, double offset,
                   double weight, float* out) {
  const LevelValue value(modulus_bits, step, offset, weight);
  parallel_for_sized(ceil_div(n, kChunk), n, [&](std::size_t task) {
    const std::size_t begin = task * kChunk, end = std::min(n, begin + kChunk);
    for (std::size_t i = begin; i < end; ++i) out[i] = value(codes[i]);
  });
}

}  // namespace fedpress
