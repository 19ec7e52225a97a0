#include "checksum.hpp"

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <vector>

#include "parallel.hpp"
#include "simd.hpp"

#if FEDPRESS_HAVE_X86_DISPATCH
#include <immintrin.h>
#endif

namespace fedpress {
namespace {

constexpr std::uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli polynomial

// Slicing-by-8 tables for the portable path.
struct Tables {
  std::array<std::array<std::uint32_t, 256>, 8> t{};
  Tables() {
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (kPoly & (0u - (c & 1u)));
      t[0][i] = c;
    }
    for (std::size_t s = 1; s < 8; ++s)
      for (std::size_t i = 0; i < 256; ++i) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
  }
};

std::uint32_t crc_portable(const std::uint8_t* p, std::size_t n, std::uint32_t crc) {
  static const Tables tab;
  const auto& t = tab.t;
  while (n >= 8) {
    std::uint32_t lo, hi;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + 4, 4);
    lo ^= crc;  // little-endian hosts (checked by the payload layer)
    crc = t[7][lo & 0xFF] ^ t[6][(lo >> 8) & 0xFF] ^ t[5][(lo >> 16) & 0xFF] ^ t[4][lo >> 24] ^
          t[3][hi & 0xFF] ^ t[2][(hi >> 8) & 0xFF] ^ t[1][(hi >> 16) & 0xFF] ^ t[0][hi >> 24];
    p += 8;
    n -= 8;
  }
  while (n--) crc = (crc >> 8) ^ t[0][(crc ^ *p++) & 0xFF];
  return crc;
}

// Combining CRCs (zlib's crc32_combine, for this polynomial): the CRC register is
// linear over GF(2), so crc(A || B) is crc(A) advanced over |B| zero bytes, XOR
// crc(B). Advancing multiplies by a 32x32 bit matrix, squared per doubling.
std::uint32_t gf2_times(const std::uint32_t* mat, std::uint32_t vec) {
  std::uint32_t sum = 0;
  for (; vec != 0; vec >>= 1, ++mat)
    if (vec & 1u) sum ^= *mat;
  return sum;
}

void gf2_square(std::uint32_t* square, const std::uint32_t* mat) {
  for (int n = 0; n < 32; ++n) square[n] = gf2_times(mat, mat[n]);
}

// The operator that advances a CRC register over `len` zero bytes.
std::array<std::uint32_t, 32> zeros_operator(std::size_t len) {
  std::array<std::uint32_t, 32> result{}, odd{}, even{};
  for (int n = 0; n < 32; ++n) result[n] = std::uint32_t{1} << n;  // identity
  odd[0] = kPoly;  // one zero bit
  for (int n = 1; n < 32; ++n) odd[n] = std::uint32_t{1} << (n - 1);
  gf2_square(even.data(), odd.data());  // two zero bits
  gf2_square(odd.data(), even.data());  // four
  std::array<std::uint32_t, 32> tmp{};
  for (; len != 0; len >>= 1) {
    gf2_square(even.data(), odd.data());  // one zero byte, then two, four, ...
    if (len & 1u) {
      for (int n = 0; n < 32; ++n) tmp[n] = gf2_times(even.data(), result[n]);
      result = tmp;
    }
    odd = even;
  }
  return result;
}

// Byte-sliced tables of one zeros_operator: advancing costs four lookups.
struct Shift {
  std::array<std::array<std::uint32_t, 256>, 4> t{};
  explicit Shift(std::size_t len) {
    const std::array<std::uint32_t, 32> op = zeros_operator(len);
    for (std::uint32_t n = 0; n < 256; ++n)
      for (int b = 0; b < 4; ++b) t[b][n] = gf2_times(op.data(), n << (8 * b));
  }
  std::uint32_t operator()(std::uint32_t crc) const {
    return t[0][crc & 0xFF] ^ t[1][(crc >> 8) & 0xFF] ^ t[2][(crc >> 16) & 0xFF] ^ t[3][crc >> 24];
  }
};

#if FEDPRESS_HAVE_X86_DISPATCH
// The crc32 instruction has a latency of three cycles and a throughput of one:
// three independent streams over consecutive stripes keep it busy, and their
// registers are combined by advancing over the stripes that follow.
constexpr std::size_t kStripe = 8192;

__attribute__((target("sse4.2"))) std::uint32_t crc_sse42(const std::uint8_t* p, std::size_t n,
                                                          std::uint32_t crc) {
  static const Shift over_stripe(kStripe);
  std::uint64_t c0 = crc;
  while (n >= 3 * kStripe) {
    std::uint64_t c1 = 0, c2 = 0;
    for (std::size_t i = 0; i < kStripe; i += 8) {
      std::uint64_t v0, v1, v2;
      std::memcpy(&v0, p + i, 8);
      std::memcpy(&v1, p + kStripe + i, 8);
      std::memcpy(&v2, p + 2 * kStripe + i, 8);
      c0 = _mm_crc32_u64(c0, v0);
      c1 = _mm_crc32_u64(c1, v1);
      c2 = _mm_crc32_u64(c2, v2);
    }
    c0 = over_stripe(static_cast<std::uint32_t>(c0)) ^ static_cast<std::uint32_t>(c1);
    c0 = over_stripe(static_cast<std::uint32_t>(c0)) ^ static_cast<std::uint32_t>(c2);
    p += 3 * kStripe;
    n -= 3 * kStripe;
  }
  while (n >= 8) {
    std::uint64_t v;
    std::memcpy(&v, p, 8);
    c0 = _mm_crc32_u64(c0, v);
    p += 8;
    n -= 8;
  }
  std::uint32_t c32 = static_cast<std::uint32_t>(c0);
  while (n--) c32 = _mm_crc32_u8(c32, *p++);
  return c32;
}

bool have_sse42() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2") != 0;
  }();
  return yes;
}
#endif

}  // namespace

namespace {

// The CRC register after `data`, from register `crc` (pre- and post-inversion are the caller's).
std::uint32_t crc_register(const std::uint8_t* data, std::size_t size, std::uint32_t crc) {
#if FEDPRESS_HAVE_X86_DISPATCH
  if (have_sse42() && active_simd() != SimdLevel::scalar) return crc_sse42(data, size, crc);
#endif
  return crc_portable(data, size, crc);
}

// Large buffers are cut into fixed pieces checksummed in parallel from a zero
// register, then combined in order (the pieces depend only on the size).
constexpr std::size_t kPiece = std::size_t{1} << 20;

}  // namespace

std::uint32_t crc32c(const std::uint8_t* data, std::size_t size, std::uint32_t crc) {
  return crc32c_with_jobs(data, size, {}, crc);
}

std::uint32_t crc32c_with_jobs(const std::uint8_t* data, std::size_t size, const std::vector<ChecksumJob>& jobs,
                               std::uint32_t crc, bool parallel) {
  crc = ~crc;
  // The units of each job that start in [begin, end).
  auto run_jobs = [&](std::size_t begin, std::size_t end) {
    for (const ChecksumJob& job : jobs) {
      const auto unit_at = [&](std::size_t byte) {  // the first unit starting at or after byte
        if (byte <= job.offset) return std::size_t{0};
        const std::size_t span = byte - job.offset;  // past the last unit: no ceil_div (it could overflow)
        return span / job.unit >= job.units ? job.units : ceil_div(span, job.unit);
      };
      const std::size_t first = unit_at(begin), last = unit_at(end);
      if (first < last) job.run(first, last);
    }
  };
  const std::size_t pieces = std::max<std::size_t>(1, ceil_div(size, kPiece));
  // The last piece takes the units starting at or after its end too (none, in a buffer
  // that holds its jobs).
  const auto piece_end = [&](std::size_t i) {
    return i + 1 == pieces ? std::numeric_limits<std::size_t>::max() : (i + 1) * kPiece;
  };
  if (!parallel || size < 2 * kPiece || num_threads() == 1) {
    if (jobs.empty()) return ~crc_register(data, size, crc);
    // Still in pieces, so each stays in cache between its checksum and its jobs.
    for (std::size_t i = 0; i < pieces; ++i) {
      const std::size_t begin = i * kPiece, end = std::min(size, begin + kPiece);
      crc = crc_register(data + begin, end - begin, crc);
      run_jobs(begin, piece_end(i));
    }
    return ~crc;
  }
  std::vector<std::uint32_t> regs(pieces);
  parallel_for(pieces, [&](std::size_t i) {
    const std::size_t begin = i * kPiece, end = std::min(size, begin + kPiece);
    regs[i] = crc_register(data + begin, end - begin, i == 0 ? crc : 0u);
    run_jobs(begin, piece_end(i));
  });
  static const Shift over_piece(kPiece);
  std::uint32_t out = regs[0];
  for (std::size_t i = 1; i < pieces; ++i) {
    const std::size_t len = std::min(kPiece, size - i * kPiece);
    out = (len == kPiece ? over_piece(out) : Shift(len)(out)) ^ regs[i];
  }
  return ~out;
}

}  // namespace fedpress
