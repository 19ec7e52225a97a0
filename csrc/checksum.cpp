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
    crc = t[7][lo & 0xFF] ^ t[6][(lo >> 8) & 0xFF] ^ t[5][(lo >> 16) & 0xFF] ^ t[4][lo >> 24] ^ t[3][hi & 0xFF] ^
          t[2][(hi >> 8) & 0xFF] ^ t[1][(hi >> 16) & 0xFF] ^ t[0][hi >> 24];
    p += 8;
    n -= 8;
  }
  while (n--) crc = (crc >> 8) ^ t[0][(crc ^ *p++) & 0xFF];
  return crc;
}

// Advancing a CRC register (zlib's crc32_combine, for this polynomial): the register is
// linear over GF(2), and advancing it over k zero bits multiplies it by x^k mod P, so
// crc(A || B) is crc(A) times x^(8 |B|) mod P, XOR crc(B). Registers hold x^e in bit 31 - e.

// a * b mod P, bit by bit (zlib's multmodp).
std::uint32_t times_mod(std::uint32_t a, std::uint32_t b) {
  std::uint32_t product = 0;
  for (std::uint32_t m = 0x80000000u; m != 0 && a != 0; m >>= 1) {
    if (a & m) {
      product ^= b;
      a ^= m;
    }
    b = (b >> 1) ^ (kPoly & (0u - (b & 1u)));
  }
  return product;
}

// The product of x^(2^(i + first)) mod P over the set bits i of `value`: x^(value 2^first).
// (first = 3: x^(8 value) for a byte count, without computing 8 value.)
std::uint32_t x_pow_mod_scaled(std::size_t value, unsigned first) {
  static const std::array<std::uint32_t, 67> powers = [] {  // x^(2^k) mod P, squared from x^1
    std::array<std::uint32_t, 67> t{};
    t[0] = 0x40000000u;
    for (std::size_t k = 1; k < t.size(); ++k) t[k] = times_mod(t[k - 1], t[k - 1]);
    return t;
  }();
  std::uint32_t r = 0x80000000u;  // x^0
  for (unsigned k = first; value != 0; value >>= 1, ++k)
    if (value & 1u) r = times_mod(powers[k], r);
  return r;
}

// Byte-sliced tables of one advance over `len` zero bytes: four lookups instead of a
// multiplication, for the lengths a checksum combines over and over.
struct Shift {
  std::array<std::array<std::uint32_t, 256>, 4> t{};
  explicit Shift(std::size_t len) {
    const std::uint32_t op = x_pow_mod_scaled(len, 3);
    for (std::uint32_t n = 0; n < 256; ++n)
      for (int b = 0; b < 4; ++b) t[b][n] = times_mod(op, n << (8 * b));
  }
  std::uint32_t operator()(std::uint32_t crc) const {
    return t[0][crc & 0xFF] ^ t[1][(crc >> 8) & 0xFF] ^ t[2][(crc >> 16) & 0xFF] ^ t[3][crc >> 24];
  }
};

#if FEDPRESS_HAVE_X86_DISPATCH
// The crc32 instruction over a short buffer (and the tail of the folding paths).
__attribute__((target("sse4.2"))) std::uint32_t crc_sse42_serial(const std::uint8_t* p, std::size_t n,
                                                                 std::uint32_t crc) {
  std::uint64_t c = crc;
  for (; n >= 8; p += 8, n -= 8) {
    std::uint64_t v;
    std::memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
  }
  std::uint32_t c32 = static_cast<std::uint32_t>(c);
  while (n--) c32 = _mm_crc32_u8(c32, *p++);
  return c32;
}

// The crc32 instruction has a latency of three cycles and a throughput of one:
// three independent streams over consecutive stripes keep it busy, and their
// registers are combined by advancing over the stripes that follow.
constexpr std::size_t kStripe = 8192;
constexpr std::size_t kStripes = 3 * kStripe;

// The register after n bytes, a multiple of kStripes.
__attribute__((target("sse4.2"))) std::uint32_t crc_sse42_stripes(const std::uint8_t* p, std::size_t n,
                                                                  std::uint32_t crc) {
  static const Shift over_stripe(kStripe);
  std::uint64_t c0 = crc;
  for (; n >= kStripes; p += kStripes, n -= kStripes) {
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
  }
  return static_cast<std::uint32_t>(c0);
}

bool have_sse42() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("sse4.2") != 0;
  }();
  return yes;
}

// Folding with carry-less multiplication (Intel's "Fast CRC Computation for Generic
// Polynomials Using PCLMULQDQ"), in the reflected bit order of the CRC register.
//
// Read a message as a polynomial over GF(2) whose first bit is the highest power:
// the register the crc32 instruction leaves is M(x) * x^32 mod P from register 0, and
// a nonzero starting register is the same as XORing it into the first four bytes. So
// the register depends only on M mod P, and any block may be replaced by a polynomial
// congruent to it, as long as it stays aligned with the bytes that follow.
//
// A 16-byte block B loaded little-endian holds its first bit in bit 0: bit t is the
// coefficient of x^(127 - t). Its low qword is H, its high qword L: B = H x^64 + L.
// Moving B forward onto a block `bits` later means adding B x^bits there, and
//   B x^bits = H x^(bits + 64) + L x^bits
//            = H x (x^(bits + 63) mod P) + L x (x^(bits - 1) mod P)   (mod P).
// Each product has degree at most 63 + 32 = 95, so it fits in the target block.
//
// The carry-less product of integers a and b, with bit i of a the coefficient of
// x^(63 - i) (as in H and L) and bit j of b that of x^(64 - j), has bit i + j the
// coefficient of x^(127 - (i + j)): the target block's order. A CRC register r holds
// x^e in bit 31 - e; r << 32 holds it in bit 63 - e = 64 - (e + 1), so read in b's order
// r << 32 is x r. The multiplier for H (for L) is therefore the register of
// x^(bits + 63) (of x^(bits - 1)) mod P, shifted left by 32.

// x^k mod P: the register that 1 (x^0, bit 31) becomes over k zero bits.
std::uint32_t x_pow_mod(std::size_t k) { return x_pow_mod_scaled(k, 0); }

// The multipliers moving a 16-byte block forward, for its low qword and its high qword,
// once per lane of a 64-byte vector. (Loaded, not broadcast: GCC 12's -Wuninitialized
// misfires on the AVX-512 intrinsics that take an undefined vector.)
struct alignas(64) FoldPairs {
  std::uint64_t k[8];
};

FoldPairs fold_pairs_by(std::size_t bytes) {
  const std::uint64_t low = std::uint64_t{x_pow_mod(8 * bytes + 63)} << 32;
  const std::uint64_t high = std::uint64_t{x_pow_mod(8 * bytes - 1)} << 32;
  return {{low, high, low, high, low, high, low, high}};
}

// fold_pairs()[i] moves a block forward by 16 (i + 1) bytes, up to the 256 of a folding step.
constexpr std::size_t kMaxFold = 256;

const std::array<FoldPairs, kMaxFold / 16>& fold_pairs() {
  static const auto pairs = [] {
    std::array<FoldPairs, kMaxFold / 16> t{};
    for (std::size_t i = 0; i < t.size(); ++i) t[i] = fold_pairs_by(16 * (i + 1));
    return t;
  }();
  return pairs;
}

__attribute__((target("sse4.2,pclmul"))) inline __m128i fold_pair(std::size_t bytes) {
  return _mm_load_si128(reinterpret_cast<const __m128i*>(fold_pairs()[bytes / 16 - 1].k));
}

__attribute__((target("sse4.2,pclmul"))) inline __m128i load_128(const std::uint8_t* at) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(at));
}

// `block` moved forward by the distance of `pair`, onto `onto`.
__attribute__((target("sse4.2,pclmul"))) inline __m128i fold_128(__m128i block, __m128i pair, __m128i onto) {
  return _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(block, pair, 0x00), _mm_clmulepi64_si128(block, pair, 0x11)),
                       onto);
}

// The register of a folded 16-byte block followed by the n bytes at p, which fold onto it
// 16 at a time first. From register 0: the starting register was XORed into the data.
__attribute__((target("sse4.2,pclmul"))) std::uint32_t finish_folded(__m128i block, const std::uint8_t* p,
                                                                     std::size_t n) {
  const __m128i by16 = fold_pair(16);
  for (; n >= 16; p += 16, n -= 16) block = fold_128(block, by16, load_128(p));
  std::uint64_t c = _mm_crc32_u64(0, static_cast<std::uint64_t>(_mm_cvtsi128_si64(block)));
  c = _mm_crc32_u64(c, static_cast<std::uint64_t>(_mm_extract_epi64(block, 1)));
  return crc_sse42_serial(p, n, static_cast<std::uint32_t>(c));
}

// Eight 16-byte accumulators, each moved forward by 128 bytes onto the next data: the
// products of one step are independent, so the multiplier's latency overlaps.
constexpr std::size_t kPclmulStep = 128;
// Where it overtakes one crc32 stream. Measured on Zen 4 it runs at about 12 GB/s from
// 512 bytes: one stream runs at 9.5, the three of crc_sse42_stripes at 27.
constexpr std::size_t kPclmulMin = 512;
static_assert(kPclmulMin >= kPclmulStep, "crc_pclmul loads one step before folding");

__attribute__((target("sse4.2,pclmul"))) std::uint32_t crc_pclmul(const std::uint8_t* p, std::size_t n,
                                                                  std::uint32_t crc) {
  __m128i x[8];
  for (std::size_t i = 0; i < 8; ++i) x[i] = load_128(p + 16 * i);
  x[0] = _mm_xor_si128(x[0], _mm_cvtsi32_si128(static_cast<int>(crc)));
  p += kPclmulStep;
  n -= kPclmulStep;
  const __m128i step = fold_pair(kPclmulStep);
  for (; n >= kPclmulStep; p += kPclmulStep, n -= kPclmulStep)
    for (std::size_t i = 0; i < 8; ++i) x[i] = fold_128(x[i], step, load_128(p + 16 * i));
  // Each onto the last, from 112, 96, ..., 16 bytes before it.
  __m128i block = x[7];
  for (std::size_t i = 0; i < 7; ++i) block = fold_128(x[i], fold_pair(16 * (7 - i)), block);
  return finish_folded(block, p, n);
}

#define FEDPRESS_VPCLMUL_TARGET "avx512f,avx512vl,vpclmulqdq,pclmul,sse4.2"

__attribute__((target(FEDPRESS_VPCLMUL_TARGET))) inline __m512i load_512(const std::uint8_t* at) {
  return _mm512_loadu_si512(at);
}

// The same pair in each 16-byte lane.
__attribute__((target(FEDPRESS_VPCLMUL_TARGET))) inline __m512i fold_pair_x4(std::size_t bytes) {
  return _mm512_load_si512(fold_pairs()[bytes / 16 - 1].k);
}

// Lanes 0, 1, 2 moved forward by 48, 32, 16 bytes (onto lane 3); lane 3's pair, zero, moves nothing.
const FoldPairs& onto_last_lane() {
  static const FoldPairs pairs = [] {
    FoldPairs t{};
    for (std::size_t lane = 0; lane < 3; ++lane)
      for (std::size_t q = 0; q < 2; ++q) t.k[2 * lane + q] = fold_pairs()[2 - lane].k[q];
    return t;
  }();
  return pairs;
}

// Each 16-byte lane of `blocks` moved forward by the distance of its lane of `pairs`, onto `onto`.
__attribute__((target(FEDPRESS_VPCLMUL_TARGET))) inline __m512i fold_512(__m512i blocks, __m512i pairs, __m512i onto) {
  return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(blocks, pairs, 0x00),
                                   _mm512_clmulepi64_epi128(blocks, pairs, 0x11), onto, 0x96);  // a ^ b ^ c
}

// Four 64-byte accumulators, each 16-byte lane moved forward by 256 bytes onto the next data.
// From about 384 bytes it beats one crc32 stream (measured on Zen 4). Loads need not be
// aligned: from a misaligned start it runs as fast.
constexpr std::size_t kVpclmulStep = 256;
constexpr std::size_t kVpclmulMin = 384;
static_assert(kVpclmulMin >= kVpclmulStep, "crc_vpclmul loads one step before folding");

__attribute__((target(FEDPRESS_VPCLMUL_TARGET))) std::uint32_t crc_vpclmul(const std::uint8_t* p, std::size_t n,
                                                                           std::uint32_t crc) {
  __m512i x0 = _mm512_xor_si512(load_512(p), _mm512_set_epi64(0, 0, 0, 0, 0, 0, 0, static_cast<long long>(crc)));
  __m512i x1 = load_512(p + 64), x2 = load_512(p + 128), x3 = load_512(p + 192);
  p += kVpclmulStep;
  n -= kVpclmulStep;
  const __m512i step = fold_pair_x4(kVpclmulStep);
  for (; n >= kVpclmulStep; p += kVpclmulStep, n -= kVpclmulStep) {
    x0 = fold_512(x0, step, load_512(p));
    x1 = fold_512(x1, step, load_512(p + 64));
    x2 = fold_512(x2, step, load_512(p + 128));
    x3 = fold_512(x3, step, load_512(p + 192));
  }
  // Onto the last accumulator, from 192, 128 and 64 bytes before it; then 64 bytes at a time.
  x3 = fold_512(x0, fold_pair_x4(192), fold_512(x1, fold_pair_x4(128), fold_512(x2, fold_pair_x4(64), x3)));
  const __m512i by64 = fold_pair_x4(64);
  for (; n >= 64; p += 64, n -= 64) x3 = fold_512(x3, by64, load_512(p));
  // Its lanes onto the last (kept as it is), then the four lanes XORed.
  alignas(64) std::uint8_t lanes[64];
  _mm512_store_si512(lanes, fold_512(x3, _mm512_load_si512(onto_last_lane().k), _mm512_maskz_mov_epi64(0xC0, x3)));
  const __m128i block = _mm_xor_si128(_mm_xor_si128(load_128(lanes), load_128(lanes + 16)),
                                      _mm_xor_si128(load_128(lanes + 32), load_128(lanes + 48)));
  return finish_folded(block, p, n);
}
#undef FEDPRESS_VPCLMUL_TARGET

bool have_pclmul() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.2");
  }();
  return yes;
}

bool have_vpclmul() {
  static const bool yes = [] {
    __builtin_cpu_init();
    // What FEDPRESS_VPCLMUL_TARGET builds for.
    return __builtin_cpu_supports("vpclmulqdq") && __builtin_cpu_supports("pclmul") &&
           __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("sse4.2");
  }();
  return yes;
}
#endif

}  // namespace

namespace {

// The CRC register after `data`, from register `crc` (pre- and post-inversion are the caller's).
std::uint32_t crc_register(const std::uint8_t* data, std::size_t size, std::uint32_t crc) {
#if FEDPRESS_HAVE_X86_DISPATCH
  const SimdLevel level = active_simd();
  if (level == SimdLevel::avx512 && size >= kVpclmulMin && have_vpclmul()) return crc_vpclmul(data, size, crc);
  if (level != SimdLevel::scalar && have_sse42()) {
    // 128-bit folding is slower than three crc32 streams, faster than one (on Zen 4):
    // the streams take whole stripes, folding what is left.
    const std::size_t striped = size - size % kStripes;
    crc = crc_sse42_stripes(data, striped, crc);
    data += striped;
    size -= striped;
    if (size >= kPclmulMin && have_pclmul()) return crc_pclmul(data, size, crc);
    return crc_sse42_serial(data, size, crc);
  }
#endif
  return crc_portable(data, size, crc);
}

// Large buffers are cut into pieces checksummed in parallel from a zero register, then
// combined in order (the pieces depend on the size and on whether there are jobs, never
// on the threads).
constexpr std::size_t kPiece = std::size_t{1} << 20;
constexpr std::size_t kSubPiece = std::size_t{64} << 10;

}  // namespace

std::uint32_t crc32c(const std::uint8_t* data, std::size_t size, std::uint32_t crc) {
  return crc32c_with_jobs(data, size, {}, crc);
}

std::uint32_t crc32c_shift(std::size_t size_b) { return x_pow_mod_scaled(size_b, 3); }

std::uint32_t crc32c_combine(std::uint32_t crc_a, std::uint32_t crc_b, std::uint32_t shift_b) {
  // The conditioning (an all-ones start, the inverted result) cancels between the parts.
  return times_mod(shift_b, crc_a) ^ crc_b;
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
  // A buffer's register from `reg`, its jobs run on the way: in sub-pieces small enough that
  // the bytes just checksummed are still in L1/L2 when the jobs read them (and the values a job
  // wrote when it checks them), instead of coming from memory again after a whole piece.
  auto checksum_running_jobs = [&](std::size_t begin, std::size_t end, std::size_t jobs_end, std::uint32_t reg) {
    if (jobs.empty()) return crc_register(data + begin, end - begin, reg);
    if (begin == end) run_jobs(begin, jobs_end);
    for (std::size_t at = begin; at < end; at += kSubPiece) {
      const std::size_t stop = std::min(end, at + kSubPiece);
      reg = crc_register(data + at, stop - at, reg);
      run_jobs(at, stop == end ? jobs_end : stop);
    }
    return reg;
  };
  // Jobs that write (a decoder's outputs) take the pieces and their sub-pieces from the last
  // to the first, and on threads smaller pieces for a smaller buffer, down to one sub-piece,
  // so that one whose jobs write many times its size (1-bit codes: 128 bytes out per byte
  // in) still gives every thread many pieces. Checks alone go forward in pieces of 1 MiB:
  // the prefetchers learn one stream per piece. The CRC does not depend on the pieces.
  const bool threads = parallel && num_threads() > 1;
  const bool writes = std::any_of(jobs.begin(), jobs.end(), [](const ChecksumJob& job) { return job.writes; });
  std::size_t piece_size = kPiece;
  if (writes && threads)
    while (piece_size > kSubPiece && size < 16 * piece_size) piece_size /= 2;
  if (size < 2 * piece_size || (!threads && !writes))
    return ~checksum_running_jobs(0, size, std::numeric_limits<std::size_t>::max(), crc);
  // A piece's register from `reg` as checksum_running_jobs gives it, its sub-pieces visited
  // from the last to the first (each from a zero register, the registers combined in order;
  // a shorter last one after them). A job writing a fresh output (a decoder's) then touches
  // each huge page first near its end: Linux zeroes a huge page with the part around the
  // faulting address last, so stores that go down from there land on lines just zeroed and
  // still in cache, where stores going up find the lines zeroed first already evicted. Filling
  // 100 MB of fresh pages on Linux 6.18 (AMD EPYC, a VM) took 15-16 ms going up and 10 ms going
  // down on one thread (glibc's memcpy goes down here too), 10-11 and 8 ms on two.
  static const Shift over_sub_piece(kSubPiece);
  auto checksum_piece_backwards = [&](std::size_t begin, std::size_t end, std::size_t jobs_end, std::uint32_t reg) {
    const std::size_t whole = (end - begin) / kSubPiece, tail = begin + whole * kSubPiece;
    std::array<std::uint32_t, kPiece / kSubPiece> sub{};
    for (std::size_t j = whole; j-- > 0;) {
      const std::size_t at = begin + j * kSubPiece, stop = at + kSubPiece;
      sub[j] = crc_register(data + at, kSubPiece, 0);
      run_jobs(at, stop == end ? jobs_end : stop);
    }
    for (std::size_t j = 0; j < whole; ++j) reg = over_sub_piece(reg) ^ sub[j];
    return tail < end ? checksum_running_jobs(tail, end, jobs_end, reg) : reg;
  };
  const std::size_t pieces = ceil_div(size, piece_size);
  // The last piece takes the units starting at or after its end too (none, in a buffer
  // that holds its jobs).
  const auto piece_end = [&](std::size_t i) {
    return i + 1 == pieces ? std::numeric_limits<std::size_t>::max() : (i + 1) * piece_size;
  };
  std::vector<std::uint32_t> regs(pieces);
  const auto piece = [&](std::size_t t) {
    const std::size_t i = writes ? pieces - 1 - t : t;  // writing, each thread's run goes down
    const std::size_t begin = i * piece_size, end = std::min(size, begin + piece_size);
    const std::uint32_t reg = i == 0 ? crc : 0u;
    regs[i] = writes ? checksum_piece_backwards(begin, end, piece_end(i), reg)
                     : checksum_running_jobs(begin, end, piece_end(i), reg);
  };
  if (threads) {
    parallel_for(pieces, piece);
  } else {
    for (std::size_t t = 0; t < pieces; ++t) piece(t);
  }
  // The register advanced over a whole piece of each size (kSubPiece << s, up to kPiece).
  static const std::vector<Shift> over_piece = [] {
    std::vector<Shift> shifts;
    for (std::size_t len = kSubPiece; len <= kPiece; len *= 2) shifts.emplace_back(len);
    return shifts;
  }();
  std::size_t which = 0;
  while ((kSubPiece << which) != piece_size) ++which;
  std::uint32_t out = regs[0];
  for (std::size_t i = 1; i < pieces; ++i) {
    const std::size_t len = std::min(piece_size, size - i * piece_size);
    out = (len == piece_size ? over_piece[which](out) : Shift(len)(out)) ^ regs[i];
  }
  return ~out;
}

}  // namespace fedpress
