#include "ricestream.hpp"

#include <algorithm>
#include <cmath>
#include <exception>
#include <stdexcept>
#include <string>

#include "bits.hpp"
#include "dispatch.hpp"
#include "indexcode.hpp"
#include "parallel.hpp"
#include "simd.hpp"
#include "varint.hpp"

#if FEDPRESS_HAVE_X86_DISPATCH
#include <immintrin.h>
#endif

#if defined(__GNUC__)
#define FEDPRESS_INLINE inline __attribute__((always_inline))
#else
#define FEDPRESS_INLINE inline
#endif

namespace fedpress {
namespace {

// 8 bytes from p (fewer, zero-filled, when end - p < 8: the stream's last bytes).
FEDPRESS_INLINE std::uint64_t load8(const std::uint8_t* p, const std::uint8_t* end) {
  std::uint64_t w = 0;
  if (end - p >= 8) {
    std::memcpy(&w, p, 8);  // little-endian hosts only (checked by the encoder)
  } else if (end > p) {
    std::memcpy(&w, p, static_cast<std::size_t>(end - p));
  }
  return w;
}

// Low field i of width l.
FEDPRESS_INLINE std::uint64_t low_field(const std::uint8_t* lows, const std::uint8_t* end, std::uint64_t i,
                                        unsigned l) {
  if (l == 0) return 0;
  const std::uint64_t bit = i * l;
  return (load8(lows + (bit >> 3), end) >> (bit & 7)) & ((std::uint64_t{1} << l) - 1);
}

// Where the fields of a group of eight lows lie for the 16-byte-load path: the group
// starts on a byte and spans l bytes; lane j's field starts at byte (j*l)/8, bit (j*l)%8,
// and needs 4 bytes from there (l <= 25). Lanes 0-3 read from the group's first byte,
// lanes 4-7 from field 4's byte (`second`), so each half fits one 16-byte load.
constexpr unsigned kWideMaxParameter = 25;
struct GroupLayout {
  alignas(32) std::uint8_t shuffle[32];
  alignas(32) std::uint32_t shift[8];
  unsigned second;
};

const GroupLayout& group_layout(unsigned l) {
  static const auto table = [] {
    std::vector<GroupLayout> t(kWideMaxParameter + 1);
    for (unsigned l = 1; l <= kWideMaxParameter; ++l) {
      GroupLayout& g = t[l];
      g.second = 4 * l / 8;
      for (unsigned j = 0; j < 8; ++j) {
        const unsigned byte = j * l / 8, base = j < 4 ? 0 : g.second;
        for (unsigned b = 0; b < 4; ++b) g.shuffle[4 * j + b] = static_cast<std::uint8_t>(byte - base + b);
        g.shift[j] = j * l % 8;
      }
    }
    return t;
  }();
  return table[l];
}

// The sum of the low fields [begin, end) one by one (any l, any position).
std::uint64_t sum_fields(const std::uint8_t* lows, const std::uint8_t* stream_end, std::uint64_t begin,
                         std::uint64_t end, unsigned l) {
  std::uint64_t sum = 0;
  for (std::uint64_t i = begin; i < end; ++i) sum += low_field(lows, stream_end, i, l);
  return sum;
}

#if FEDPRESS_HAVE_X86_DISPATCH
// The eight fields of group g in 32-bit lanes.
__attribute__((target("avx2"))) FEDPRESS_INLINE __m256i group_fields(const std::uint8_t* lows, std::uint64_t g,
                                                                     unsigned l, const GroupLayout& layout,
                                                                     __m256i shuffle, __m256i shift, __m256i mask) {
  const std::uint8_t* p = lows + g * l;
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + layout.second));
  const __m256i bytes = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(bytes, shuffle), shift), mask);
}

// The sum of the fields of groups [g_begin, g_end), all inside wide_groups.
__attribute__((target("avx2"))) std::uint64_t sum_groups_avx2(const std::uint8_t* lows, std::uint64_t g_begin,
                                                              std::uint64_t g_end, unsigned l) {
  const GroupLayout& layout = group_layout(l);
  const __m256i shuffle = _mm256_load_si256(reinterpret_cast<const __m256i*>(layout.shuffle));
  const __m256i shift = _mm256_load_si256(reinterpret_cast<const __m256i*>(layout.shift));
  const __m256i mask = _mm256_set1_epi32(static_cast<int>((std::uint32_t{1} << l) - 1));
  __m256i acc = _mm256_setzero_si256();  // 64-bit lanes
  for (std::uint64_t g = g_begin; g < g_end; ++g) {
    const __m256i f = group_fields(lows, g, l, layout, shuffle, shift, mask);
    acc = _mm256_add_epi64(acc, _mm256_cvtepu32_epi64(_mm256_castsi256_si128(f)));
    acc = _mm256_add_epi64(acc, _mm256_cvtepu32_epi64(_mm256_extracti128_si256(f, 1)));
  }
  alignas(32) std::uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

// Indices first + 8g' + j of groups [0, groups) of the batch: first + j + (zeros << l)
// + the running sum of the lows; returns the sum after them.
__attribute__((target("avx2"))) std::uint64_t indices_avx2(const std::uint8_t* lows, std::uint64_t first,
                                                           unsigned groups, unsigned l, const std::uint32_t* zeros,
                                                           std::uint64_t low_sum, std::uint32_t* out) {
  const GroupLayout& layout = group_layout(l);
  const __m256i shuffle = _mm256_load_si256(reinterpret_cast<const __m256i*>(layout.shuffle));
  const __m256i shift = _mm256_load_si256(reinterpret_cast<const __m256i*>(layout.shift));
  const __m256i mask = _mm256_set1_epi32(static_cast<int>((std::uint32_t{1} << l) - 1));
  const __m128i count = _mm_cvtsi32_si128(static_cast<int>(l));
  const __m256i upper = _mm256_setr_epi32(0, 0, 0, 0, -1, -1, -1, -1);
  const __m256i lane3 = _mm256_set1_epi32(3);
  // Indices and sums are below n <= 2^32 in a checked stream: 32-bit lanes hold them.
  __m256i rank = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<std::uint32_t>(first))),
                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i sum = _mm256_set1_epi32(static_cast<int>(static_cast<std::uint32_t>(low_sum)));
  const __m256i eight = _mm256_set1_epi32(8);
  for (unsigned g = 0; g < groups; ++g) {
    __m256i f = group_fields(lows, first / 8 + g, l, layout, shuffle, shift, mask);
    f = _mm256_add_epi32(f, _mm256_slli_si256(f, 4));  // inclusive prefix sums within each half
    f = _mm256_add_epi32(f, _mm256_slli_si256(f, 8));
    f = _mm256_add_epi32(f, _mm256_and_si256(_mm256_permutevar8x32_epi32(f, lane3), upper));
    f = _mm256_add_epi32(f, sum);
    const __m256i z = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(zeros + 8 * g));
    const __m256i x = _mm256_add_epi32(_mm256_add_epi32(_mm256_sll_epi32(z, count), f), rank);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8 * g), x);
    sum = _mm256_permutevar8x32_epi32(f, _mm256_set1_epi32(7));
    rank = _mm256_add_epi32(rank, eight);
  }
  return static_cast<std::uint32_t>(_mm256_cvtsi256_si32(sum));  // the sums are below 2^32
}
#endif

// The zeros before each of the next `count` ones of the unary part, from (word, cur):
// zeros[j] = (position of the one) - (rank of its index, first + j). Each word's ones are
// written eight at a time without a branch per one (slots past the last are junk), and
// the word's ones beyond `count` are left in cur.
FEDPRESS_INLINE void unary_zeros(const std::uint8_t* unary, const std::uint8_t* end, std::size_t& word,
                                 std::uint64_t& cur, std::uint64_t first, unsigned count, std::uint32_t* zeros) {
  unsigned produced = 0;
  while (produced < count) {
    while (cur == 0) {  // a checked stream holds a one for every index: this ends inside it
      word += 8;
      cur = load8(unary + word, end);
    }
    const unsigned ones = popcount64(cur);
    const std::uint64_t bias = std::uint64_t{word} * 8 - (first + produced);
    std::uint64_t t = cur;
    std::uint32_t* out = zeros + produced;
    for (unsigned j = 0; j < ones; j += 8) {
      for (unsigned u = 0; u < 8; ++u) {
        // | bit 63 keeps ctz defined once t runs out (those slots are junk).
        out[j + u] = static_cast<std::uint32_t>(bias - (j + u) + ctz64(t | (std::uint64_t{1} << 63)));
        t &= t - 1;
      }
    }
    const unsigned take = std::min(ones, count - produced);
    if (take == ones) {
      cur = 0;
    } else {  // keep the ones from the first not taken: its bit is zeros + rank - bias
      const unsigned bit = static_cast<unsigned>((out[take] + take - static_cast<std::uint32_t>(bias)) & 63u);
      cur &= ~std::uint64_t{0} << bit;
    }
    produced += take;
  }
}

// The ones of the unary part; with marks, also where each checkpoint resumes: one bit
// past one i-1 (0-based), for i = every, 2*every, ... below k.
FEDPRESS_INLINE std::uint64_t scan_unary_body(const std::uint8_t* p, std::size_t size, const std::uint8_t* end,
                                              std::uint64_t k, std::uint64_t every, std::vector<std::uint64_t>* marks) {
  std::uint64_t ones = 0, mark = every;
  for (std::size_t byte = 0; byte < size; byte += 8) {
    const std::uint64_t w = load8(p + byte, end);
    const unsigned c = popcount64(w);
    for (; marks != nullptr && mark < k && ones + c >= mark; mark += every) {
      std::uint64_t v = w;
      for (std::uint64_t j = mark - 1 - ones; j > 0; --j) v &= v - 1;  // the (mark-1-ones)-th one of w
      marks->push_back(std::uint64_t{byte} * 8 + ctz64(v) + 1);
    }
    ones += c;
  }
  return ones;
}

#if FEDPRESS_HAVE_X86_DISPATCH
__attribute__((target("popcnt"))) std::uint64_t scan_unary_fast(const std::uint8_t* p, std::size_t size,
                                                                const std::uint8_t* end, std::uint64_t k,
                                                                std::uint64_t every,
                                                                std::vector<std::uint64_t>* marks) {
  return scan_unary_body(p, size, end, k, every, marks);
}
#endif

std::uint64_t scan_unary(const std::uint8_t* p, std::size_t size, const std::uint8_t* end, std::uint64_t k,
                         std::uint64_t every, std::vector<std::uint64_t>* marks) {
#if FEDPRESS_HAVE_X86_DISPATCH
  if (active_simd() != SimdLevel::scalar) return scan_unary_fast(p, size, end, k, every, marks);
#endif
  return scan_unary_body(p, size, end, k, every, marks);
}

#if FEDPRESS_HAVE_X86_DISPATCH
// unary_zeros with AVX-512: each 16 bits of a word become their ones' zero counts in
// one compress (vpcompressd), not one count-trailing-zeros per one.
__attribute__((target("avx512f,avx512vl,bmi,bmi2,popcnt"))) void unary_zeros_avx512(
    const std::uint8_t* unary, const std::uint8_t* end, std::size_t& word, std::uint64_t& cur, std::uint64_t first,
    unsigned count, std::uint32_t* zeros) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  unsigned produced = 0;
  while (produced < count) {
    while (cur == 0) {
      word += 8;
      cur = load8(unary + word, end);
    }
    const unsigned ones = popcount64(cur);
    if (ones > count - produced) break;  // the batch ends inside this word: one by one below
    // zeros = bit position - rank; a lane's bit is 16c + lane, its rank produced + its slot.
    const std::uint64_t bias = std::uint64_t{word} * 8 - (first + produced);
    std::uint32_t* out = zeros + produced;
    unsigned slot = 0;
    for (unsigned c = 0; c < 4; ++c) {
      const __mmask16 m = static_cast<__mmask16>(cur >> (16 * c));
      const __m512i bits =
          _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(16 * c + static_cast<std::uint32_t>(bias) - slot)));
      const __m512i packed = _mm512_maskz_compress_epi32(m, bits);
      // Lane j of packed is bit(j) + bias - slot; the index's zeros subtract j too.
      _mm512_storeu_si512(out + slot, _mm512_sub_epi32(packed, iota));
      slot += static_cast<unsigned>(__builtin_popcount(m));
    }
    cur = 0;
    produced += ones;
  }
  if (produced < count) unary_zeros(unary, end, word, cur, first + produced, count - produced, zeros + produced);
}

__attribute__((target("avx2,bmi,bmi2,popcnt"))) void unary_zeros_fast(const std::uint8_t* unary,
                                                                      const std::uint8_t* end, std::size_t& word,
                                                                      std::uint64_t& cur, std::uint64_t first,
                                                                      unsigned count, std::uint32_t* zeros) {
  unary_zeros(unary, end, word, cur, first, count, zeros);
}

// The sum of many small fields by bit classes, with AVX-512's vector popcount: every bit p
// of a field array starting at bit 0 adds 2^(p mod l), so the sum is the popcounts of the
// bits of each class c, shifted by c. Per 64 bytes that is l popcounts where the group path
// takes 512 / l groups' worth of shuffles (6-bit lows, a top-1% stream's: about 5 times less).
constexpr unsigned kPopcountMaxParameter = 12;

bool has_vector_popcount() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
  return yes;
}

// Class masks for width L: 512-bit block b's bit t is of class (512 b + t) mod L; the blocks'
// classes repeat every kPeriod blocks, bits[b % kPeriod][c] holding the bits of class c.
template <unsigned L>
struct ClassMasks {
  static constexpr unsigned kPeriod = L / (L & (~L + 1u));  // L / gcd(512, L), for L <= 512
  alignas(64) std::uint64_t bits[kPeriod][L][8] = {};
  ClassMasks() {
    for (unsigned j = 0; j < kPeriod; ++j)
      for (unsigned t = 0; t < 512; ++t) bits[j][(512 * j + t) % L][t / 64] |= std::uint64_t{1} << (t % 64);
  }
};

// acc[c] += the popcounts of block's bits of class c, in 64-bit lanes.
template <unsigned L>
__attribute__((target("avx512f,avx512vpopcntdq"))) FEDPRESS_INLINE void add_block_classes(
    __m512i (&acc)[L], __m512i block, const std::uint64_t (&masks)[L][8]) {
  for (unsigned c = 0; c < L; ++c) {
    const __m512i m = _mm512_load_si512(reinterpret_cast<const void*>(masks[c]));
    acc[c] = _mm512_add_epi64(acc[c], _mm512_popcnt_epi64(_mm512_and_si512(block, m)));
  }
}

// The sum of the L-bit fields in the first `bits` bits from p (a field starts at p's bit 0).
// (Counts per class, shifted at the end: GCC 12's vector shifts and reductions warn of an
// undefined register at -O1.)
template <unsigned L>
__attribute__((target("avx512f,avx512vpopcntdq"))) std::uint64_t sum_fields_popcount(const std::uint8_t* p,
                                                                                     std::uint64_t bits) {
  static const ClassMasks<L> masks;
  __m512i acc[L];
  for (unsigned c = 0; c < L; ++c) acc[c] = _mm512_setzero_si512();
  const std::uint64_t blocks = bits / 512;
  unsigned j = 0;
  for (std::uint64_t b = 0; b < blocks; ++b) {
    add_block_classes<L>(acc, _mm512_loadu_si512(reinterpret_cast<const void*>(p + 64 * b)), masks.bits[j]);
    if (++j == ClassMasks<L>::kPeriod) j = 0;
  }
  const unsigned rest = static_cast<unsigned>(bits % 512);
  if (rest != 0) {  // the last bits, copied (nothing is read past them) and cut at the last one
    alignas(64) std::uint8_t tail[64] = {};
    std::memcpy(tail, p + 64 * blocks, (rest + 7) / 8);
    if (rest % 8 != 0) tail[rest / 8] = static_cast<std::uint8_t>(tail[rest / 8] & ((1u << (rest % 8)) - 1));
    add_block_classes<L>(acc, _mm512_load_si512(reinterpret_cast<const void*>(tail)), masks.bits[j]);
  }
  std::uint64_t sum = 0;
  for (unsigned c = 0; c < L; ++c) {
    alignas(64) std::uint64_t lanes[8];
    _mm512_store_si512(reinterpret_cast<void*>(lanes), acc[c]);
    for (const std::uint64_t lane : lanes) sum += lane << c;
  }
  return sum;
}

std::uint64_t sum_fields_popcount_any(const std::uint8_t* p, std::uint64_t bits, unsigned l) {
  std::uint64_t sum = 0;
  with_constant<1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12>(
      l, [&](auto c) { sum = sum_fields_popcount<decltype(c)::value>(p, bits); });
  return sum;
}

static_assert(kPopcountMaxParameter == 12, "sum_fields_popcount_any instantiates each parameter up to 12");

#endif

// Sum of the lows [begin, end), begin a multiple of 8: by bit classes with AVX-512's
// popcount for small parameters, in whole groups below wide_groups with AVX2, the rest
// one by one.
std::uint64_t sum_lows(const std::uint8_t* lows, const std::uint8_t* stream_end, std::uint64_t begin, std::uint64_t end,
                       unsigned l, std::uint64_t wide_groups) {
  if (l == 0) return 0;
#if FEDPRESS_HAVE_X86_DISPATCH
  if (l <= kPopcountMaxParameter && active_simd() == SimdLevel::avx512 && has_vector_popcount())
    return sum_fields_popcount_any(lows + begin / 8 * l, (end - begin) * l, l);
  if (l <= kWideMaxParameter && active_simd() != SimdLevel::scalar) {
    const std::uint64_t g_end = std::min(end / 8, wide_groups);
    if (g_end > begin / 8)
      return sum_groups_avx2(lows, begin / 8, g_end, l) + sum_fields(lows, stream_end, g_end * 8, end, l);
  }
#endif
  (void)wide_groups;
  return sum_fields(lows, stream_end, begin, end, l);
}

std::size_t varint_size(std::uint64_t v) {
  std::size_t bytes = 1;
  for (; v >= 0x80; v >>= 7) ++bytes;
  return bytes;
}

// The stream's bytes: the count varint, the parameter byte, the lows, the unary part.
std::size_t stream_size(std::size_t k, unsigned l, std::uint64_t bits) {
  if (k == 0) return varint_size(0);
  return varint_size(k) + 1 + static_cast<std::size_t>((std::uint64_t{k} * l + 7) / 8) +
         static_cast<std::size_t>((bits - std::uint64_t{k} * l + 7) / 8);
}

}  // namespace

RicePlan plan_rice_stream(const std::uint32_t* idx, std::size_t k, std::uint64_t n) {
  if (k > n) throw std::invalid_argument("more indices than n");
  if (k == 0) return {0, varint_size(0)};
  // The Rice parameter near the geometric optimum (about log2 of the mean gap times
  // ln 2), then the exact coded size of it and its neighbours, all from one pass over the
  // indices: clustered top-k indices can prefer a smaller one.
  const double mean_gap = static_cast<double>(n - k) / static_cast<double>(k);
  const double guess = mean_gap * std::log(2.0);
  const int l0 = guess >= 2.0 ? static_cast<int>(std::floor(std::log2(guess))) : 0;
  const unsigned lo = static_cast<unsigned>(std::max(0, l0 - 1));
  const unsigned candidates = std::min<unsigned>(kMaxRiceParameter, static_cast<unsigned>(l0 + 2)) - lo + 1;
  std::uint64_t quotients[4] = {};
  for (std::size_t i = 0; i < k; ++i) {
    const std::uint32_t gap = checked_gap(idx, i, n);
    for (unsigned c = 0; c < 4; ++c)
      quotients[c] += std::uint64_t{gap} >> (lo + c);  // (4 always: unused ones cost nothing)
  }
  unsigned best_l = lo;
  std::uint64_t best_bits = std::numeric_limits<std::uint64_t>::max();
  for (unsigned c = 0; c < candidates; ++c) {
    const std::uint64_t bits = std::uint64_t{k} * (lo + c + 1) + quotients[c];
    if (bits < best_bits) {
      best_bits = bits;
      best_l = lo + c;
    }
  }
  return {best_l, stream_size(k, best_l, best_bits)};
}

void write_rice_stream(const std::uint32_t* idx, std::size_t k, std::uint64_t n, const RicePlan& plan,
                       std::uint8_t* out) {
  const unsigned l = plan.parameter;
  if (l > kMaxRiceParameter) throw std::invalid_argument("Rice parameter " + std::to_string(l) + " is over 31");
  if (k == 0 && (l != 0 || plan.size != varint_size(0)))
    throw std::invalid_argument("the indices do not code in the planned " + std::to_string(plan.size) + " bytes");
  const std::size_t head = k == 0 ? varint_size(0) : varint_size(k) + 1;
  const std::uint64_t low_bits = std::uint64_t{k} * l;
  const std::size_t low_bytes = static_cast<std::size_t>((low_bits + 7) / 8);
  if (plan.size < head + low_bytes + (k ? 1 : 0))
    throw std::invalid_argument("the indices do not code in the planned " + std::to_string(plan.size) + " bytes");
  std::size_t pos = 0;  // the count, a varint
  std::uint64_t v = k;
  for (; v >= 0x80; v >>= 7) out[pos++] = static_cast<std::uint8_t>(v | 0x80);
  out[pos++] = static_cast<std::uint8_t>(v);
  if (k == 0) return;
  out[pos++] = static_cast<std::uint8_t>(l);
  std::uint8_t* lows = out + pos;
  std::uint8_t* unary = lows + low_bytes;
  const std::size_t unary_bytes = plan.size - pos - low_bytes;
  std::memset(unary, 0, unary_bytes);  // ones are set into zeros (a payload's buffer is not cleared)
  // One pass: each index checked, its low bits appended (k * l bits in all: low_bytes,
  // whole words then the last bytes) and its unary one set, every one of them inside the
  // planned size (a plan that is not the indices' is refused, never written past).
  const std::uint64_t mask = l ? (std::uint64_t{1} << l) - 1 : 0;
  std::uint64_t acc = 0, bit = 0;
  unsigned fill = 0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < k; ++i) {
    const std::uint32_t gap = checked_gap(idx, i, n);
    acc |= (gap & mask) << fill;
    fill += l;
    if (fill >= 32) {
      const std::uint32_t word = static_cast<std::uint32_t>(acc);
      std::memcpy(lows + at, &word, 4);
      at += 4;
      acc >>= 32;
      fill -= 32;
    }
    bit += gap >> l;
    if ((bit >> 3) >= unary_bytes)
      throw std::invalid_argument("the indices do not code in the planned " + std::to_string(plan.size) + " bytes");
    unary[bit >> 3] = static_cast<std::uint8_t>(unary[bit >> 3] | (1u << (bit & 7)));
    ++bit;
  }
  for (; fill > 0; fill = fill >= 8 ? fill - 8 : 0) {
    lows[at++] = static_cast<std::uint8_t>(acc);
    acc >>= 8;
  }
  if ((bit + 7) / 8 != unary_bytes)
    throw std::invalid_argument("the indices do not code in the planned " + std::to_string(plan.size) + " bytes");
}

std::vector<std::uint8_t> encode_rice_stream(const std::uint32_t* idx, std::size_t k, std::uint64_t n) {
  const RicePlan plan = plan_rice_stream(idx, k, n);
  std::vector<std::uint8_t> out(plan.size);
  write_rice_stream(idx, k, n, plan, out.data());
  return out;
}

std::vector<RicePlan> plan_rice_streams(const std::vector<const std::uint32_t*>& indices,
                                        const std::vector<std::size_t>& counts,
                                        const std::vector<std::uint64_t>& sizes) {
  std::vector<RicePlan> out(indices.size());
  std::vector<std::string> errors(indices.size());
  std::size_t total = 0;
  for (const std::size_t k : counts) total += k;
  parallel_for_sized(indices.size(), 6 * total, [&](std::size_t i) {  // ~6 element-passes per index
    const SerialScope serial;
    try {
      out[i] = plan_rice_stream(indices[i], counts[i], sizes[i]);
    } catch (const std::invalid_argument& e) {
      errors[i] = e.what();
    }
  });
  for (std::size_t i = 0; i < errors.size(); ++i)
    if (!errors[i].empty()) throw std::invalid_argument("array " + std::to_string(i) + ": " + errors[i]);
  return out;
}

RiceStream::RiceStream(const std::uint8_t* data, std::size_t size, std::uint64_t n, std::uint64_t max_count,
                       bool checkpoints) {
  if (n > (std::uint64_t{1} << 32)) throw std::invalid_argument("n must be <= 2^32");  // indices are uint32
  std::size_t pos = 0;
  k_ = get_varint(data, size, pos, "count");
  if (k_ > n) throw MalformedData("index stream: count " + std::to_string(k_) + " exceeds n = " + std::to_string(n));
  if (k_ > max_count)
    throw MalformedData("index stream: count " + std::to_string(k_) + " exceeds the limit " +
                        std::to_string(max_count));
  end_ = data + size;
  if (k_ == 0) {
    if (pos != size)
      throw MalformedData("index stream: " + std::to_string(size - pos) + " trailing bytes after an empty list");
    if (checkpoints) checkpoints_.push_back({});
    return;
  }
  if (pos == size) throw MalformedData("index stream truncated: no Rice parameter after the count");
  const unsigned l = data[pos++];
  if (l > kMaxRiceParameter)
    throw MalformedData("index stream: Rice parameter " + std::to_string(l) + " exceeds " +
                        std::to_string(kMaxRiceParameter));
  l_ = l;
  const std::uint64_t low_bits = k_ * l;
  const std::uint64_t low_bytes = (low_bits + 7) / 8;
  // Every index adds one bit to the unary part: it holds at least one byte.
  if (size - pos < low_bytes + 1)
    throw MalformedData("index stream truncated: " + std::to_string(k_) + " indices with " + std::to_string(l) +
                        "-bit low parts need " + std::to_string(low_bytes) + " bytes of them and a unary part, have " +
                        std::to_string(size - pos) + " bytes");
  lows_ = data + pos;
  unary_ = lows_ + low_bytes;
  unary_size_ = static_cast<std::size_t>(size - pos - low_bytes);
  if (low_bits % 8 != 0 && (lows_[low_bytes - 1] >> (low_bits % 8)) != 0)
    throw MalformedData("index stream: nonzero padding bits after the low parts");
  if (unary_[unary_size_ - 1] == 0)
    throw MalformedData("index stream: the unary part ends with a zero byte (trailing bytes or padding)");
  const std::uint64_t body = static_cast<std::uint64_t>(end_ - lows_);
  if (l >= 1 && l <= kWideMaxParameter) {  // a group's two 16-byte loads end by byte g*l + second + 16
    const std::uint64_t reach = group_layout(l).second + 16;
    wide_groups_ = body < reach ? 0 : std::min((body - reach) / l + 1, k_ / 8);
  }

  std::vector<std::uint64_t> resume_bits;  // for each checkpoint after the first
  const std::uint64_t ones =
      scan_unary(unary_, unary_size_, end_, k_, kCheckpointEvery, checkpoints ? &resume_bits : nullptr);
  if (ones != k_)
    throw MalformedData("index stream: the unary part holds " + std::to_string(ones) + " codes, the count says " +
                        std::to_string(k_));
  // The sum of the lows, in checkpoint-sized chunks: at each checkpoint, the sum before it.
  std::vector<std::uint64_t> low_sums;
  std::uint64_t low_sum = 0;
  for (std::uint64_t i = 0; i < k_; i += kCheckpointEvery) {
    if (checkpoints) low_sums.push_back(low_sum);
    low_sum += sum_lows(lows_, end_, i, std::min(k_, i + kCheckpointEvery), l, wide_groups_);
  }
  // The last index, k-1 + (zeros in the unary part << l) + the sum of the lows, must be
  // below n; the shift can pass 2^64, so the zeros are compared by a shift of the room.
  unsigned top = 7;
  while (!(unary_[unary_size_ - 1] >> top & 1)) --top;
  const std::uint64_t last_one = std::uint64_t{unary_size_ - 1} * 8 + top;
  const std::uint64_t zeros = last_one + 1 - k_;
  const std::uint64_t floor_value = (k_ - 1) + low_sum;  // < 2^64: k <= 2^32, each low < 2^31
  if (floor_value >= n || zeros > ((n - 1 - floor_value) >> l))
    throw MalformedData("index stream: the last index lies beyond n = " + std::to_string(n));
  if (!checkpoints) return;

  checkpoints_.reserve(low_sums.size());
  checkpoints_.push_back({0, 0, 0});
  for (std::size_t c = 1; c < low_sums.size(); ++c) {
    const std::uint64_t i = c * kCheckpointEvery, bit = resume_bits[c - 1];
    // The sum of the gaps before i, plus one per index before it.
    checkpoints_.push_back({i, bit, i + ((bit - i) << l) + low_sums[c]});
  }
}

RiceCursor RiceStream::begin() const { return RiceCursor(*this, RiceCheckpoint{}); }

RiceCursor RiceStream::seek(std::uint64_t value) const {
  RiceCheckpoint from;
  if (!checkpoints_.empty()) {
    // The last checkpoint whose previous index lies below value.
    auto it = std::upper_bound(checkpoints_.begin(), checkpoints_.end(), value,
                               [](std::uint64_t v, const RiceCheckpoint& c) { return v < c.next; });
    from = *(it - 1);  // the first checkpoint has next = 0 <= value
  }
  RiceCursor cursor(*this, from);
  cursor.runs_below(value, [](std::uint64_t, const std::uint32_t*, unsigned) {});
  return cursor;
}

void RiceStream::decode(std::uint32_t* out) const {
  RiceCursor c = begin();
  c.runs_below(RiceCursor::kEnd, [out](std::uint64_t i, const std::uint32_t* indices, unsigned count) {
    std::memcpy(out + i, indices, std::size_t{count} * sizeof(std::uint32_t));
  });
}

RiceCursor::RiceCursor(const RiceStream& s, const RiceCheckpoint& at)
    : s_(&s), k_(s.k_), next_(at.i), word_(static_cast<std::size_t>(at.bit >> 6) * 8) {
  if (at.i % 8 != 0) throw std::logic_error("a Rice cursor starts at a multiple of 8");
  // next = i + ((bit - i) << l) + (the lows before i): recover that sum.
  low_sum_ = at.next - at.i - ((at.bit - at.i) << s.l_);
#if FEDPRESS_HAVE_X86_DISPATCH
  wide_ = s.l_ >= 1 && s.l_ <= kWideMaxParameter && active_simd() != SimdLevel::scalar;
#else
  wide_ = false;
#endif
  if (next_ < k_) {
    cur_ = load8(s.unary_ + word_, s.end_) & (~std::uint64_t{0} << (at.bit & 63));
    refill();
  }
}

void RiceCursor::prefetch(std::uint64_t entries) const {
#if defined(__GNUC__) || defined(__clang__)
  const RiceStream& s = *s_;
  if (next_ >= k_) return;
  entries = std::min(entries, k_ - next_);
  // Offsets bounded by the parts' sizes: no pointer is formed past the stream.
  const double unary_per_entry = static_cast<double>(s.unary_size_) / static_cast<double>(k_);
  const std::size_t unary_bytes =
      std::min(static_cast<std::size_t>(static_cast<double>(entries) * unary_per_entry) + 8, s.unary_size_ - word_);
  for (std::size_t b = 0; b < unary_bytes; b += 64) __builtin_prefetch(s.unary_ + word_ + b, 0, 3);
  const std::size_t low_at = static_cast<std::size_t>(next_ * s.l_ / 8);
  const std::size_t low_size = static_cast<std::size_t>(s.unary_ - s.lows_);
  const std::size_t low_bytes = std::min(static_cast<std::size_t>(entries * s.l_ / 8) + 8, low_size - low_at);
  for (std::size_t b = 0; b < low_bytes; b += 64) __builtin_prefetch(s.lows_ + low_at + b, 0, 3);
#else
  (void)entries;
#endif
}

void RiceCursor::refill() {
  const RiceStream& s = *s_;
  const std::uint64_t first = next_;
  const unsigned count = static_cast<unsigned>(std::min<std::uint64_t>(kAhead, k_ - first));
  std::uint32_t zeros[kAhead + 64];  // a word's ones are written eight (or 16) at a time past count
#if FEDPRESS_HAVE_X86_DISPATCH
  if (wide_) {
    if (active_simd() == SimdLevel::avx512)
      unary_zeros_avx512(s.unary_, s.end_, word_, cur_, first, count, zeros);
    else
      unary_zeros_fast(s.unary_, s.end_, word_, cur_, first, count, zeros);
    // Whole groups inside the stream's 16-byte reach with AVX2, the rest one by one.
    const std::uint64_t groups =
        std::min<std::uint64_t>(count / 8, s.wide_groups_ > first / 8 ? s.wide_groups_ - first / 8 : 0);
    low_sum_ = indices_avx2(s.lows_, first, static_cast<unsigned>(groups), s.l_, zeros, low_sum_, ahead_);
    for (std::uint64_t j = groups * 8; j < count; ++j) {
      low_sum_ += low_field(s.lows_, s.end_, first + j, s.l_);
      ahead_[j] = static_cast<std::uint32_t>(first + j + (std::uint64_t{zeros[j]} << s.l_) + low_sum_);
    }
  } else
#endif
  {
    unary_zeros(s.unary_, s.end_, word_, cur_, first, count, zeros);
    for (unsigned j = 0; j < count; ++j) {
      low_sum_ += low_field(s.lows_, s.end_, first + j, s.l_);
      ahead_[j] = static_cast<std::uint32_t>(first + j + (std::uint64_t{zeros[j]} << s.l_) + low_sum_);
    }
  }
  first_ = first;
  pos_ = 0;
  len_ = count;
  next_ = first + count;
}

}  // namespace fedpress
