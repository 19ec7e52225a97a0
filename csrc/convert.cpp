#include "convert.hpp"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#include "parallel.hpp"
#include "simd.hpp"

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#endif

namespace fedpress {
namespace {

constexpr std::size_t kChunk = std::size_t{1} << 16;
constexpr float kHalfMax = 65504.0f;

#if defined(__FLT16_MAX__) && !defined(FEDPRESS_NO_FLOAT16)
// The compiler's _Float16 conversions are correctly rounded; the x86-64-v3/v4
// clones turn them into vcvtps2ph / vcvtph2ps.
FEDPRESS_CLONES
void to_half_range(const float* x, std::size_t n, unsigned char* out) {
  for (std::size_t i = 0; i < n; ++i) {
    float v = x[i];
    v = v > kHalfMax ? kHalfMax : (v < -kHalfMax ? -kHalfMax : v);
    const _Float16 h = static_cast<_Float16>(v);
    std::memcpy(out + 2 * i, &h, 2);
  }
}

FEDPRESS_CLONES
void from_half_range(const unsigned char* h, std::size_t n, float* out) {
  for (std::size_t i = 0; i < n; ++i) {
    _Float16 v;
    std::memcpy(&v, h + 2 * i, 2);
    out[i] = static_cast<float>(v);
  }
}
#else
// Portable round-to-nearest-even (after F. Giesen's float_to_half_fast3_rtne);
// inputs are clamped to the finite half range first.
std::uint16_t one_to_half(float f) {
  f = std::min(std::max(f, -kHalfMax), kHalfMax);
  std::uint32_t x;
  std::memcpy(&x, &f, 4);
  const std::uint32_t sign = x & 0x80000000u;
  x ^= sign;
  std::uint32_t o;
  if (x < (113u << 23)) {  // below the smallest normal half: let float addition round
    const std::uint32_t magic_u = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    float v, magic;
    std::memcpy(&v, &x, 4);
    std::memcpy(&magic, &magic_u, 4);
    v += magic;
    std::uint32_t u;
    std::memcpy(&u, &v, 4);
    o = u - magic_u;
  } else {
    const std::uint32_t mant_odd = (x >> 13) & 1u;
    x += (static_cast<std::uint32_t>(15 - 127) << 23) + 0xFFFu + mant_odd;
    o = x >> 13;
  }
  return static_cast<std::uint16_t>(o | (sign >> 16));
}

float one_from_half(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  float v;
  if (exp == 0) {
    v = static_cast<float>(mant) * 0x1p-24f;  // subnormal (or zero): exact in float
  } else {
    const std::uint32_t bits = exp == 31 ? (0xFFu << 23) | (mant << 13) : ((exp + 112u) << 23) | (mant << 13);
    std::memcpy(&v, &bits, 4);
  }
  std::uint32_t out;
  std::memcpy(&out, &v, 4);
  out |= sign;
  std::memcpy(&v, &out, 4);
  return v;
}

void to_half_range(const float* x, std::size_t n, unsigned char* out) {
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint16_t h = one_to_half(x[i]);
    std::memcpy(out + 2 * i, &h, 2);
  }
}

void from_half_range(const unsigned char* h, std::size_t n, float* out) {
  for (std::size_t i = 0; i < n; ++i) {
    std::uint16_t bits;
    std::memcpy(&bits, h + 2 * i, 2);
    out[i] = one_from_half(bits);
  }
}
#endif

// bfloat16 is the top half of a float32: round the dropped 16 bits to nearest
// even, and saturate magnitudes that would round up to infinity.
FEDPRESS_CLONES
void to_bf16_range(const float* x, std::size_t n, unsigned char* out) {
  for (std::size_t i = 0; i < n; ++i) {
    std::uint32_t u;
    std::memcpy(&u, x + i, 4);
    const std::uint32_t sign = u & 0x80000000u;
    std::uint32_t mag = u & 0x7FFFFFFFu;
    mag = (mag + 0x7FFFu + ((mag >> 16) & 1u)) >> 16;
    mag = mag > 0x7F7Fu ? 0x7F7Fu : mag;
    const std::uint16_t h = static_cast<std::uint16_t>((sign >> 16) | mag);
    std::memcpy(out + 2 * i, &h, 2);
  }
}

// h may start at an odd address (see convert.hpp), hence memcpy loads: the
// compiler emits the same instructions as for a uint16_t load, vectorised.
FEDPRESS_CLONES
void from_bf16_range(const unsigned char* h, std::size_t n, float* out) {
  for (std::size_t i = 0; i < n; ++i) {
    std::uint16_t bits;
    std::memcpy(&bits, h + 2 * i, 2);
    const std::uint32_t u = static_cast<std::uint32_t>(bits) << 16;
    std::memcpy(out + i, &u, 4);
  }
}

// Whether every float32 of x[0, len) (at any address) is finite: its exponent bits are not all ones.
FEDPRESS_CLONES
bool all_finite(const void* x, std::size_t len) {
  const auto* bytes = static_cast<const unsigned char*>(x);
  std::uint32_t any_special = 0;
  for (std::size_t i = 0; i < len; ++i) {
    std::uint32_t u;
    std::memcpy(&u, bytes + 4 * i, 4);
    any_special |= static_cast<std::uint32_t>((u & 0x7F800000u) == 0x7F800000u);
  }
  return any_special == 0;
}

// float32 values at any address, copied.
void copy_floats(const unsigned char* src, std::size_t n, float* out) { std::memcpy(out, src, 4 * n); }

// copy_floats with non-temporal stores: for an output that is not read again soon (a large
// decoded tensor), the stores do not first read the lines they fill.
void stream_floats(const unsigned char* src, std::size_t n, float* out) {
#if defined(__x86_64__) || defined(_M_X64)
  auto* dst = reinterpret_cast<unsigned char*>(out);
  const std::size_t bytes = 4 * n;
  std::size_t i = 0;
  const std::size_t misaligned = reinterpret_cast<std::uintptr_t>(dst) & 15;
  if (misaligned) {
    i = std::min(bytes, 16 - misaligned);
    std::memcpy(dst, src, i);
  }
  for (; i + 64 <= bytes; i += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
  }
  std::memcpy(dst + i, src + i, bytes - i);
  _mm_sfence();  // visible to the thread that reads the output once the job is done
#else
  copy_floats(src, n, out);
#endif
}

// Runs fn(begin, count) over fixed chunks of [0, n), in parallel.
template <typename Fn>
void chunked(std::size_t n, Fn fn) {
  parallel_for_sized(ceil_div(n, kChunk), n, [&](std::size_t c) {
    const std::size_t begin = c * kChunk;
    fn(begin, std::min(n, begin + kChunk) - begin);
  });
}

}  // namespace

void float_to_half(const float* x, std::size_t n, void* out) {
  auto* bytes = static_cast<unsigned char*>(out);
  chunked(n, [&](std::size_t begin, std::size_t count) { to_half_range(x + begin, count, bytes + 2 * begin); });
}

void half_to_float(const void* h, std::size_t n, float* out) {
  const auto* bytes = static_cast<const unsigned char*>(h);
  chunked(n, [&](std::size_t begin, std::size_t count) { from_half_range(bytes + 2 * begin, count, out + begin); });
}

void float_to_bfloat16(const float* x, std::size_t n, void* out) {
  auto* bytes = static_cast<unsigned char*>(out);
  chunked(n, [&](std::size_t begin, std::size_t count) { to_bf16_range(x + begin, count, bytes + 2 * begin); });
}

void bfloat16_to_float(const void* h, std::size_t n, float* out) {
  const auto* bytes = static_cast<const unsigned char*>(h);
  chunked(n, [&](std::size_t begin, std::size_t count) { from_bf16_range(bytes + 2 * begin, count, out + begin); });
}

bool decode_floats_serial(FloatCode code, const void* data, std::size_t n, float* out, bool streaming) {
  const auto* in = static_cast<const unsigned char*>(data);
  if (code == FloatCode::fp32 && streaming) {
    // Checked on the input (in cache; the output is streamed past it), then copied.
    const bool finite = all_finite(in, n);
    stream_floats(in, n, out);
    return finite;
  }
  switch (code) {
    case FloatCode::fp32:
      copy_floats(in, n, out);
      break;
    case FloatCode::fp16:
      from_half_range(in, n, out);
      break;
    case FloatCode::bf16:
      from_bf16_range(in, n, out);
      break;
  }
  // Checked while the values are still in cache: the pass costs next to nothing.
  return all_finite(out, n);
}

bool decode_floats(FloatCode code, const void* data, std::size_t n, float* out) {
  const auto* bytes = static_cast<const unsigned char*>(data);
  const std::size_t width = code == FloatCode::fp32 ? 4 : 2;
  std::atomic<bool> finite{true};
  const bool streaming = n >= kStreamingValues;
  chunked(n, [&](std::size_t begin, std::size_t count) {
    if (!decode_floats_serial(code, bytes + width * begin, count, out + begin, streaming))
      finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

bool floats_finite(const void* data, std::size_t n) { return all_finite(data, n); }

}  // namespace fedpress
