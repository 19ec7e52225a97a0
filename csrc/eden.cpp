#include "eden.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "errors.hpp"
#include "parallel.hpp"
#include "rng.hpp"
#include "rotate.hpp"
#include "simd.hpp"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "eden.cpp assembles the little-endian code stream with native loads and stores"
#endif

namespace fedpress {
namespace {

// Work layout. A task is a fixed range of whole rotation blocks of at least
// kSeg elements (one block when blocks are larger); a segment is kSeg
// consecutive elements; a run is the part of one block inside one segment.
// kSeg is a multiple of 8, so every segment starts on a byte boundary of the
// packed stream for every bit width (3 bits: 8 codes in 3 bytes), and so does
// every run when blocks have 8 elements or more. Task, segment and run
// boundaries depend only on (m, block), which with the fixed-order sums below
// makes every output independent of the thread count.
constexpr std::size_t kSeg = std::size_t{1} << 14;
// Thread-local scratch kept between calls up to this many floats (4 MiB).
constexpr std::size_t kKeepScratch = std::size_t{1} << 20;
// Blocks of extreme norms: below r = 2^-60 the multiplier sqrt(L) / r could
// overflow float32 and above 2^60 lose precision as a subnormal, so y is
// first scaled by 2^64 or 2^-64 (exact for all but negligible elements).
constexpr double kTinyNorm = 0x1p-60, kHugeNorm = 0x1p60;

// Bytes of len packed codes of `bits` bits: ceil(len * bits / 8). Inline, so
// that kernels' copies of constant sizes become plain loads and stores.
constexpr std::size_t code_bytes(std::size_t len, int bits) {
  return (len / 8) * static_cast<std::size_t>(bits) + ((len % 8) * static_cast<std::size_t>(bits) + 7) / 8;
}

// ----------------------------------------------------------- vector types --
// The kernels are written with GCC/Clang vector extensions, 8 lanes wide:
// one ymm register in the AVX2 and AVX-512 FEDPRESS_CLONES versions (two xmm
// in the baseline), lane for lane the same values in every clone. Table
// lookups are 8- and 16-entry permutes (vpermps, vpermi2ps, or two vpermps
// and a blend), which both instruction sets have. Helpers take vectors by
// reference, never by value (that would change the ABI between clones), and
// are forced inline: a clone's instruction set applies only to code inside it.
// A last partial vector of a run is computed on a zero-padded copy.
#if !defined(__GNUC__) && !defined(__clang__)
#error "the EDEN kernels are written with GCC/Clang vector extensions: build fedpress with GCC or Clang"
#endif
typedef float VF __attribute__((vector_size(32)));
typedef std::int32_t VI __attribute__((vector_size(32)));
typedef std::uint32_t VU __attribute__((vector_size(32)));
typedef float VQ __attribute__((vector_size(16)));   // half a VF
typedef double VD __attribute__((vector_size(32)));  // a VQ widened
typedef std::uint8_t VB __attribute__((vector_size(8)));
constexpr std::size_t kW = 8;
constexpr VI kIota = {0, 1, 2, 3, 4, 5, 6, 7};
constexpr std::int32_t kAbsMask = 0x7FFFFFFF;

#if defined(__GNUC__)
#define FEDPRESS_INLINE inline __attribute__((always_inline))
#define FEDPRESS_INLINE_LAMBDA __attribute__((always_inline))
#else
#define FEDPRESS_INLINE inline
#define FEDPRESS_INLINE_LAMBDA
#endif

// Calls f(std::integral_constant<int, B>{}) for B = bits (1, 2, 3, 4 or 8):
// one instantiation of a kernel body per width. Callers pass lambdas marked
// FEDPRESS_INLINE_LAMBDA so that the body lands inside the calling clone.
template <typename F>
FEDPRESS_INLINE decltype(auto) with_bits(int bits, F&& f) {
  switch (bits) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 3:
      return f(std::integral_constant<int, 3>{});
    case 4:
      return f(std::integral_constant<int, 4>{});
    default:
      return f(std::integral_constant<int, 8>{});
  }
}

constexpr int log2_exact(int v) { return v <= 1 ? 0 : 1 + log2_exact(v / 2); }

// Lane permutes, results through references (a vector returned by value changes the
// ABI outside the AVX clones, which GCC warns about). GCC's __builtin_shuffle takes any
// index vector (indices taken modulo the lane count); Clang has only
// __builtin_shufflevector, whose indices must be constants, so there a variable permute
// is a loop over the lanes (which Clang turns into vpermps in the AVX2 clones).
template <int... I>
FEDPRESS_INLINE void or_permuted(VU& v) {
#if defined(__clang__)
  v |= __builtin_shufflevector(v, v, I...);
#else
  v |= __builtin_shuffle(v, VU{I...});
#endif
}

FEDPRESS_INLINE void permute(const VF& table, const VI& idx, VF& out) {
#if defined(__clang__)
  for (std::size_t i = 0; i < kW; ++i) out[i] = table[idx[i] & 7];
#else
  out = __builtin_shuffle(table, idx);
#endif
}

FEDPRESS_INLINE void permute2(const VF& low, const VF& high, const VI& idx, VF& out) {
#if defined(__clang__)
  for (std::size_t i = 0; i < kW; ++i) {
    const int j = idx[i] & 15;
    out[i] = j < 8 ? low[j] : high[j - 8];
  }
#else
  out = __builtin_shuffle(low, high, idx);
#endif
}

// out = table[idx] for a table of N entries held in N / 8 vectors (one for
// N <= 8): 8- and 16-entry permutes, larger tables by selecting on the
// index's higher bits.
template <int N>
FEDPRESS_INLINE void lookup(const VF* table, const VI& idx, VF& out) {
  if constexpr (N <= 8) {
    permute(table[0], idx, out);
  } else if constexpr (N == 16) {
    permute2(table[0], table[1], idx, out);
  } else {
    VF low, high;
    lookup<N / 2>(table, idx, low);
    lookup<N / 2>(table + N / 16, idx, high);
    out = (idx & (N / 2)) != 0 ? high : low;
  }
}

// ------------------------------------------------------------------ tables --
// Tables of one bit width. Both modes find a value's place among H - 1
// positive thresholds (H = 2^(bits-1)) with a branchless binary search: at
// the step of size s the position is a multiple of 2s and the threshold to
// compare is thr[pos + s - 1], one of H / (2s) candidates, kept in registers.
// Both tables are symmetric, so the search runs on |z|.
using SearchCandidates = std::array<float, 128 + kW>;
struct Tables {
  int bits = 0;
  int half = 0;                        // H: codes >= H are the positive entries
  std::array<float, 256> centroids{};  // eden_centroids(bits)
  std::array<float, 256> levels{};     // eden_stochastic_levels(bits)
  std::array<float, 128> cpos{};       // positive centroids: cpos[j] = centroids[H + j]
  // Nearest: thresholds the positive boundaries 0.5f * (cpos[j] + cpos[j + 1]).
  // Candidates of the step with c = H / (2s) of them at search[c - 1 ...]
  // (1 + 2 + ... + c / 2 = c - 1 floats before them), zero-padded for loads.
  SearchCandidates search{};
  // Stochastic: |z| lies in the interval [llow[j], lpos[j]] of the positive
  // half, j the number of positive levels below |z| (the last, kEdenClip,
  // not counted): lpos[j] = levels[H + j], llow[j] = levels[H + j - 1]
  // (llow[0] = -lpos[0], the interval across 0). Thresholds lpos[0 .. H - 2].
  std::array<float, 128> lpos{}, llow{};
  SearchCandidates lsearch{};
};

// The candidates of a search over thresholds thr[0 .. half - 2] (the largest
// index compared is half - 2: the last step's H / 2 candidates end there).
SearchCandidates search_candidates(const std::array<float, 128>& thr, int half) {
  SearchCandidates out{};
  for (int s = half / 2; s >= 1; s /= 2) {
    const int c = half / (2 * s);
    for (int k = 0; k < c; ++k) out[c - 1 + k] = thr[k * 2 * s + s - 1];
  }
  return out;
}

Tables make_tables(int bits, const float* centroids, const float* levels) {
  Tables t;
  t.bits = bits;
  const int count = 1 << bits;
  t.half = count / 2;
  std::copy(centroids, centroids + count, t.centroids.begin());
  std::copy(levels, levels + count, t.levels.begin());
  std::array<float, 128> tpos{};
  for (int j = 0; j < t.half; ++j) t.cpos[j] = centroids[t.half + j];
  for (int j = 0; j + 1 < t.half; ++j) tpos[j] = 0.5f * (t.cpos[j] + t.cpos[j + 1]);
  t.search = search_candidates(tpos, t.half);
  for (int j = 0; j < t.half; ++j) {
    t.lpos[j] = levels[t.half + j];
    t.llow[j] = j == 0 ? -levels[t.half] : levels[t.half + j - 1];
  }
  t.lsearch = search_candidates(t.lpos, t.half);
  return t;
}

const Tables& tables(int bits) {
  static const std::array<Tables, 5> all = [] {
    std::array<Tables, 5> a;
    const int widths[5] = {1, 2, 3, 4, 8};
    for (int i = 0; i < 5; ++i)
      a[i] = make_tables(widths[i], eden_centroids(widths[i]), eden_stochastic_levels(widths[i]));
    return a;
  }();
  return all[bits == 8 ? 4 : bits - 1];
}

const float* table_of(const Tables& t, EdenRounding rounding) {
  return rounding == EdenRounding::nearest ? t.centroids.data() : t.levels.data();
}

std::uint32_t stochastic_key(std::uint64_t seed) { return static_cast<std::uint32_t>(hash64(seed, 0xEDE5u)); }

void check_bits(int bits) {
  if (!valid_eden_bits(bits)) throw std::invalid_argument("bits must be 1, 2, 3, 4 or 8, got " + std::to_string(bits));
}

// Validates the arguments shared by every entry point; returns the layout.
RhtLayout checked_layout(std::size_t m, std::size_t n, std::size_t block, int bits) {
  check_bits(bits);
  const RhtLayout l = rht_layout(n, block);  // checks block
  if (m != l.size())
    throw std::invalid_argument("the rotated vector has " + std::to_string(m) + " elements, expected " +
                                std::to_string(l.size()) + " = rht_padded_size(" + std::to_string(n) + ", " +
                                std::to_string(block) + ")");
  return l;
}

// ------------------------------------------------------------------- sums --
// Float64 sums in 8 lanes: lane l adds every 8th term in order, then the
// lanes fold in a fixed tree. Lane-wise adds need no reassociation, so every
// clone computes the same sums.
struct LaneSums {
  VD lo = {}, hi = {};  // lanes 0-3, 4-7
  double fold() const {
    double acc[kW];
    std::memcpy(acc, &lo, sizeof lo);
    std::memcpy(acc + kW / 2, &hi, sizeof hi);
    for (std::size_t w = kW / 2; w > 0; w /= 2)
      for (std::size_t l = 0; l < w; ++l) acc[l] += acc[l + w];
    return acc[0];
  }
  // += a * b lane-wise, in float64 (exact products of floats).
  FEDPRESS_INLINE void add_products(const VF& a, const VF& b) {
    VQ a_lo, a_hi, b_lo, b_hi;
    std::memcpy(&a_lo, &a, sizeof a_lo);
    std::memcpy(&a_hi, reinterpret_cast<const char*>(&a) + sizeof a_lo, sizeof a_hi);
    std::memcpy(&b_lo, &b, sizeof b_lo);
    std::memcpy(&b_hi, reinterpret_cast<const char*>(&b) + sizeof b_lo, sizeof b_hi);
    lo += __builtin_convertvector(a_lo, VD) * __builtin_convertvector(b_lo, VD);
    hi += __builtin_convertvector(a_hi, VD) * __builtin_convertvector(b_hi, VD);
  }
};

FEDPRESS_CLONES
double sum_squares(const float* y, std::size_t len) {
  LaneSums acc;
  std::size_t i = 0;
  for (; i + kW <= len; i += kW) {
    VF v;
    std::memcpy(&v, y + i, sizeof v);
    acc.add_products(v, v);
  }
  VF tail = {};
  std::memcpy(&tail, y + i, (len - i) * sizeof(float));
  acc.add_products(tail, tail);
  return acc.fold();
}

// --------------------------------------------------------------- packing --
// Eight codes of B bits fill exactly B bytes, a group: code j of a group sits
// at bit B*j of the group's little-endian B-byte word. One vector of codes is
// one group.
template <int B>
constexpr VU kGroupShifts = {0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B};

// The word of a whole group, from loads of its B bytes only.
template <int B>
FEDPRESS_INLINE std::uint32_t load_group(const std::uint8_t* p) {
  if constexpr (B == 3) {
    std::uint16_t low;
    std::memcpy(&low, p, 2);
    return low | static_cast<std::uint32_t>(p[2]) << 16;
  } else {
    using Word = std::conditional_t<B == 1, std::uint8_t, std::conditional_t<B == 2, std::uint16_t, std::uint32_t>>;
    Word w;
    std::memcpy(&w, p, B);
    return w;
  }
}

// The stream bytes of a vector of codes (lanes >= w count as zero codes, so
// the padding bits of a last partial byte are zero) at o, which holds lane 0.
template <int B>
FEDPRESS_INLINE void pack8(const VI& code, std::size_t w, std::uint8_t* o) {
  if constexpr (B == 8) {
    const VB bytes = __builtin_convertvector(code, VB);
    std::memcpy(o, &bytes, w);
  } else {
    VU c = (VU)code;
    if (w < kW) c = kIota < static_cast<std::int32_t>(w) ? c : VU{};
    c <<= kGroupShifts<B>;
    // OR all lanes into lane 0.
    or_permuted<4, 5, 6, 7, 0, 1, 2, 3>(c);
    or_permuted<2, 3, 0, 1, 6, 7, 4, 5>(c);
    or_permuted<1, 0, 3, 2, 5, 4, 7, 6>(c);
    const std::uint32_t word = c[0];
    std::memcpy(o, &word, w == kW ? B : code_bytes(w, B));
  }
}

// The vector of codes at o (lanes >= w zero, reading only their bytes).
template <int B>
FEDPRESS_INLINE void unpack8(const std::uint8_t* o, std::size_t w, VI& code) {
  if constexpr (B == 8) {
    VB bytes = {};
    std::memcpy(&bytes, o, w);
    code = __builtin_convertvector(bytes, VI);
  } else {
    std::uint32_t word = 0;
    if (w == kW)
      word = load_group<B>(o);
    else
      for (std::size_t k = 0; k < code_bytes(w, B); ++k) word |= static_cast<std::uint32_t>(o[k]) << (8 * k);
    code = (VI)(((VU{} + word) >> kGroupShifts<B>)&((1u << B) - 1));
  }
}

// Converts len codes between one per byte and the packed stream (code 0 at
// the stream pointer): from bytes to the stream when kPack, else back.
template <int B, bool kPack>
FEDPRESS_INLINE void repack(const std::uint8_t* from, std::size_t len, std::uint8_t* to) {
  if (B == 8) {
    std::memcpy(to, from, len);
    return;
  }
  for (std::size_t i = 0; i < len; i += kW) {
    const std::size_t w = std::min(kW, len - i);
    VB bytes = {};
    VI code;
    if (kPack) {
      std::memcpy(&bytes, from + i, w);
      code = __builtin_convertvector(bytes, VI);
      pack8<B>(code, w, to + i / 8 * B);
    } else {
      unpack8<B>(from + i / 8 * B, w, code);
      bytes = __builtin_convertvector(code, VB);
      std::memcpy(to + i, &bytes, w);
    }
  }
}

FEDPRESS_CLONES
void pack(const std::uint8_t* codes, std::size_t len, int bits, std::uint8_t* out) {
  with_bits(bits, [&](auto b) FEDPRESS_INLINE_LAMBDA { repack<decltype(b)::value, true>(codes, len, out); });
}

FEDPRESS_CLONES
void unpack(const std::uint8_t* in, std::size_t len, int bits, std::uint8_t* codes) {
  with_bits(bits, [&](auto b) FEDPRESS_INLINE_LAMBDA { repack<decltype(b)::value, false>(in, len, codes); });
}

// ------------------------------------------------------------ code kernels --
// Where a kernel's codes go: straight into the packed stream (`out` holds the
// run's first element, which starts a byte) or one per byte into a buffer.
enum class Sink { packed, bytes };

// Runs body(K, src, w, i) over a run of len floats (K an integral_constant, i
// the offset in the run): K = kBatch vectors of 8 at a time while they fit,
// then K = 1, the last partial vector (w < 8 lanes) read from a zero-padded
// copy.
template <int kBatch, typename Body>
FEDPRESS_INLINE void for_each_batch(const float* y, std::size_t len, Body&& body) {
  std::size_t i = 0;
  for (; i + kBatch * kW <= len; i += kBatch * kW) body(std::integral_constant<int, kBatch>{}, y + i, kW, i);
  for (; i + kW <= len; i += kW) body(std::integral_constant<int, 1>{}, y + i, kW, i);
  if (i < len) {
    float pad[kW] = {};
    std::memcpy(pad, y + i, (len - i) * sizeof(float));
    body(std::integral_constant<int, 1>{}, pad, len - i, i);
  }
}

template <int B>
FEDPRESS_INLINE void emit(const VI& code, std::size_t w, std::size_t i, Sink sink, std::uint8_t* out) {
  if (sink == Sink::packed) {
    pack8<B>(code, w, out + i / 8 * B);
  } else {
    const VB bytes = __builtin_convertvector(code, VB);
    std::memcpy(out + i, &bytes, w);
  }
}

// z = (y * pre) * mul is the coordinate in N(0, 1) units.
struct Normaliser {
  float pre, mul;
};

// z and |z| of K vectors from src.
template <int K>
FEDPRESS_INLINE void normalise(const float* src, const VF& pre, const VF& mul, VF* z, VF* a) {
  for (int k = 0; k < K; ++k) {
    VF v;
    std::memcpy(&v, src + k * kW, sizeof v);
    z[k] = (v * pre) * mul;
    a[k] = (VF)((VI)z[k] & kAbsMask);
  }
}

// Sums of one run for the nearest mode, in N(0, 1) units (bounded, so the
// float partial sums cannot overflow whatever y is).
struct NearestSums {
  double dot = 0.0;  // <|z|, |c(code)|> = <y, c(code)> * pre * mul
  double csq = 0.0;  // ||c(code)||^2
};

// Vectors of a table of n entries (at least one).
constexpr int table_vectors(int n) { return n > 8 ? n / 8 : 1; }

// The steps of a search with C, 2C, ... candidates (see Tables) for K vectors
// side by side: the step with C candidates compares against thr[pos + s - 1],
// s = H / (2C). Each step is a chain of dependent permutes and compares;
// interleaving K independent vectors hides their latency. With kBracket the
// steps also keep the last threshold found below a[k] in lo[k] and the last
// not below in hi[k]: the search path of a perfect binary tree passes through
// both neighbours of the final position, so these end as thr[pos - 1] and
// thr[pos] (or stay as given where pos is 0 or H - 1).
template <int H, int C, int K, bool kBracket>
FEDPRESS_INLINE void search_steps(const VF* cand, const VF& first, const VF* a, VI* pos, VF* lo, VF* hi) {
  if constexpr (C <= H / 2) {
    constexpr int s = H / (2 * C);
    for (int k = 0; k < K; ++k) {
      VF thr;
      if constexpr (C == 1)
        thr = first;
      else
        lookup<C>(cand, pos[k] >> log2_exact(2 * s), thr);
      const VI above = a[k] > thr;
      pos[k] += above & s;
      if constexpr (kBracket) {
        lo[k] = above ? thr : lo[k];
        hi[k] = above ? hi[k] : thr;
      }
    }
    search_steps<H, 2 * C, K, kBracket>(cand + (C == 1 ? 0 : table_vectors(C)), first, a, pos, lo, hi);
  }
}

// Vectors of the candidates of a search over H - 1 thresholds, less the
// first step's single one (broadcast instead).
constexpr int candidate_vectors(int h) {
  int n = 0;
  for (int c = 2; c <= h / 2; c *= 2) n += table_vectors(c);
  return n > 0 ? n : 1;
}

// A search's candidates, in registers.
template <int H>
struct SearchRegisters {
  VF cand[candidate_vectors(H)] = {};
  VF first = {};
  FEDPRESS_INLINE explicit SearchRegisters(const SearchCandidates& src) {
    for (int k = 0, c = 2; c <= H / 2; c *= 2)
      for (int part = 0; part < table_vectors(c); ++part)
        std::memcpy(&cand[k++], src.data() + c - 1 + 8 * part, sizeof(VF));
    first = VF{} + src[0];
  }
  // pos[k] = the number of thresholds below a[k] (pos[k] zero on entry).
  template <int K>
  FEDPRESS_INLINE void find(const VF* a, VI* pos) const {
    search_steps<H, 1, K, false>(cand, first, a, pos, nullptr, nullptr);
  }
  // Also the thresholds on either side (see search_steps).
  template <int K>
  FEDPRESS_INLINE void bracket(const VF* a, VI* pos, VF* lo, VF* hi) const {
    search_steps<H, 1, K, true>(cand, first, a, pos, lo, hi);
  }
};

// A table of H floats in registers.
template <int H>
struct TableRegisters {
  VF v[table_vectors(H)];
  FEDPRESS_INLINE explicit TableRegisters(const float* src) {
    for (int k = 0; k < table_vectors(H); ++k) std::memcpy(&v[k], src + 8 * k, sizeof(VF));
  }
  FEDPRESS_INLINE void get(const VI& idx, VF& out) const { lookup<H>(v, idx, out); }
};

// Nearest-centroid codes of one run. The code's distance from the middle,
// pos, is the number of positive boundaries below |z|; |z| on a boundary
// rounds toward 0, z = +-0 gets code H. The sums add float products over
// kFlush vectors, then move them into float64 lanes: a fixed pattern,
// relative error ~1e-7.
template <int B, bool kWithCsq>
FEDPRESS_INLINE NearestSums nearest_run(const float* y, std::size_t len, Normaliser nm, const Tables& t, Sink sink,
                                        std::uint8_t* out) {
  constexpr int H = 1 << (B - 1);
  constexpr int kBatch = B == 8 ? 8 : 2;  // vectors searched side by side
  constexpr std::size_t kFlush = 16;
  const SearchRegisters<H> search(t.search);
  const TableRegisters<H> cent(t.cpos.data());
  const VF pre = VF{} + nm.pre, mul = VF{} + nm.mul;
  LaneSums dot, csq;
  VF part_dot = {}, part_csq = {};
  // K vectors from src (element i of the run onwards), the last with w lanes.
  auto body = [&](auto batch, const float* src, std::size_t w, std::size_t i) FEDPRESS_INLINE_LAMBDA {
    constexpr int K = decltype(batch)::value;
    VF z[K], a[K], c[K];
    VI pos[K] = {};
    normalise<K>(src, pre, mul, z, a);
    search.template find<K>(a, pos);
    for (int k = 0; k < K; ++k) cent.get(pos[k], c[k]);
    for (int k = 0; k < K; ++k) {
      const std::size_t at = i + k * kW, lanes = k == K - 1 ? w : kW;
      const VI code = z[k] < 0.0f ? (H - 1) - pos[k] : H + pos[k];
      emit<B>(code, lanes, at, sink, out);
      if (lanes < kW) c[k] = kIota < static_cast<std::int32_t>(lanes) ? c[k] : VF{};  // padding adds nothing
      // sign(c(code)) == sign(z): <z, c> adds |z| * |c|.
      part_dot += a[k] * c[k];
      if (kWithCsq) part_csq += c[k] * c[k];
      if (at / kW % kFlush == kFlush - 1 || lanes < kW || at + kW == len) {
        dot.add_products(part_dot, VF{} + 1.0f);
        if (kWithCsq) csq.add_products(part_csq, VF{} + 1.0f);
        part_dot = VF{};
        part_csq = VF{};
      }
    }
  };
  for_each_batch<kBatch>(y, len, body);
  return {dot.fold(), kWithCsq ? csq.fold() : 0.0};
}

// csq (||c||^2) is only needed for the MSE scale.
FEDPRESS_CLONES
NearestSums nearest_codes(const float* y, std::size_t len, Normaliser nm, const Tables& t, bool with_csq, Sink sink,
                          std::uint8_t* out) {
  return with_bits(t.bits, [&](auto b) FEDPRESS_INLINE_LAMBDA {
    constexpr int B = decltype(b)::value;
    return with_csq ? nearest_run<B, true>(y, len, nm, t, sink, out) : nearest_run<B, false>(y, len, nm, t, sink, out);
  });
}

// Stochastic codes of one run. Element g (global position `first` + i), in
// the interval [lo, hi] of |z| found as Tables describes, rounds away from lo
// when u_g * (hi - lo) < (|z| - lo), u_g = (hash32(key, g) >> 8) / 2^24 (for
// z < 0 the interval is [-hi, -lo] and "up" is toward -lo: the distance from
// -hi is hi - |z|). |z| > kEdenClip is an outlier: flag 1, code the end level
// of its sign. Returns the number of outliers.
template <int B>
FEDPRESS_INLINE std::size_t stochastic_run(const float* y, std::size_t len, std::size_t first, Normaliser nm,
                                           const Tables& t, std::uint32_t key, Sink sink, std::uint8_t* out,
                                           std::uint8_t* flags) {
  constexpr int H = 1 << (B - 1);
  constexpr int kBatch = B == 8 ? 4 : 2;  // vectors searched side by side
  const SearchRegisters<H> search(t.lsearch);
  const VF clip = VF{} + kEdenClip, pre = VF{} + nm.pre, mul = VF{} + nm.mul;
  VI outliers = {};
  auto body = [&](auto batch, const float* src, std::size_t w, std::size_t i) FEDPRESS_INLINE_LAMBDA {
    constexpr int K = decltype(batch)::value;
    VF z[K], a[K], lo[K], hi[K];
    VI pos[K] = {};
    normalise<K>(src, pre, mul, z, a);
    for (int k = 0; k < K; ++k) {
      lo[k] = VF{} + t.llow[0];
      hi[k] = VF{} + t.lpos[H - 1];
    }
    // [lo, hi] = [llow[pos], lpos[pos]] without table lookups.
    search.template bracket<K>(a, pos, lo, hi);
    for (int k = 0; k < K; ++k) {
      const std::size_t at = i + k * kW, lanes = k == K - 1 ? w : kW;
      const VI neg = z[k] < 0.0f;
      const VF dist = neg ? hi[k] - a[k] : a[k] - lo[k];
      VU h = ((VU)kIota + static_cast<std::uint32_t>(first + at)) ^ key;  // hash32, lane-wise
      h ^= h >> 16;
      h *= 0x7FEB352Du;
      h ^= h >> 15;
      h *= 0x846CA68Bu;
      h ^= h >> 16;
      const VF u = __builtin_convertvector((VI)(h >> 8), VF) * 0x1p-24f;
      const VI up = u * (hi[k] - lo[k]) < dist;  // -1 or 0
      const VI out_lane = a[k] > clip;
      const VI end = neg ? VI{} : VI{} + (2 * H - 1);
      const VI code = out_lane ? end : (H - 1) + (neg ? -pos[k] : pos[k]) - up;
      emit<B>(code, lanes, at, sink, out);
      outliers -= out_lane;  // zero padding is never an outlier
      const VB flag_bytes = __builtin_convertvector(out_lane & 1, VB);
      std::memcpy(flags + at, &flag_bytes, lanes);
    }
  };
  for_each_batch<kBatch>(y, len, body);
  std::size_t count = 0;
  for (std::size_t l = 0; l < kW; ++l) count += static_cast<std::size_t>(outliers[l]);
  return count;
}

FEDPRESS_CLONES
std::size_t stochastic_codes(const float* y, std::size_t len, std::size_t first, Normaliser nm, const Tables& t,
                             std::uint32_t key, Sink sink, std::uint8_t* out, std::uint8_t* flags) {
  return with_bits(t.bits, [&](auto b) FEDPRESS_INLINE_LAMBDA {
    return stochastic_run<decltype(b)::value>(y, len, first, nm, t, key, sink, out, flags);
  });
}

// ------------------------------------------------------------- dequantize --
// Decoded values of a run: v_i = scale * table[code_i]; out_i = v_i, or
// out_i + weight * v_i when accumulating. Same float operations whichever
// path, so accumulating equals adding weight times the dequantized vector.
// One code per byte (8 bits, or codes unpacked into bytes): a gather per
// element, which the compiler vectorises given the disjoint pointers.
FEDPRESS_CLONES
void decode_bytes(const std::uint8_t* __restrict in, std::size_t len, const float* __restrict table, float scale,
                  float* __restrict out) {
  for (std::size_t i = 0; i < len; ++i) out[i] = scale * table[in[i]];
}

FEDPRESS_CLONES
void accumulate_bytes(const std::uint8_t* __restrict in, std::size_t len, const float* __restrict table, float scale,
                      float weight, float* __restrict out) {
  for (std::size_t i = 0; i < len; ++i) out[i] = out[i] + weight * (scale * table[in[i]]);
}

// Up to 4 bits: a group of eight codes at a time, looked up in the table held
// in registers.
template <int B, bool kAccumulate>
FEDPRESS_INLINE void decode_packed(const std::uint8_t* in, std::size_t len, const float* table, float scale,
                                   float weight, float* out) {
  float padded[16] = {};
  std::memcpy(padded, table, sizeof(float) << B);
  VF tab[2];
  std::memcpy(tab, padded, sizeof tab);
  const VF s = VF{} + scale, wt = VF{} + weight;
  auto body = [&](std::size_t i, std::size_t w) {
    VI code;
    unpack8<B>(in + i / 8 * B, w, code);
    VF v;
    lookup<(1 << B)>(tab, code, v);
    v = s * v;
    if (kAccumulate) {
      VF acc = {};
      std::memcpy(&acc, out + i, w * sizeof(float));
      v = acc + wt * v;
    }
    std::memcpy(out + i, &v, w * sizeof(float));
  };
  std::size_t i = 0;
  for (; i + kW <= len; i += kW) body(i, kW);
  if (i < len) body(i, len - i);
}

// A run starting on a byte boundary of the stream (in holds its first code).
FEDPRESS_CLONES
void decode_codes(const std::uint8_t* in, std::size_t len, int bits, const float* table, float scale, bool accumulate,
                  float weight, float* out) {
  if (bits == 8) {
    if (accumulate)
      accumulate_bytes(in, len, table, scale, weight, out);
    else
      decode_bytes(in, len, table, scale, out);
    return;
  }
  with_bits(bits, [&](auto b) FEDPRESS_INLINE_LAMBDA {
    constexpr int B = decltype(b)::value < 8 ? decltype(b)::value : 4;  // 8 went above
    if (accumulate)
      decode_packed<B, true>(in, len, table, scale, weight, out);
    else
      decode_packed<B, false>(in, len, table, scale, weight, out);
  });
}

// Whether every run starts on a byte boundary (runs start at multiples of the
// block, every code is a byte at 8 bits), so kernels can read and write the
// stream directly.
bool direct_runs(const RhtLayout& l, int bits) { return bits == 8 || l.block >= kW; }

// Calls f(block, first, len) for each run of [begin, end): the parts of blocks
// inside segments of kSeg elements. begin is a multiple of kSeg.
template <typename F>
void for_each_run(const RhtLayout& l, std::size_t begin, std::size_t end, F&& f) {
  for (std::size_t i = begin; i < end;) {
    const std::size_t b = i / l.block;
    const std::size_t run_end = std::min({end, (b + 1) * l.block, (i / kSeg + 1) * kSeg});
    f(b, i, run_end - i);
    i = run_end;
  }
}

// Decodes elements [begin, end) (begin a multiple of kSeg) into out, which
// holds element begin.
void decode_range(const std::uint8_t* packed, const float* scales, const RhtLayout& l, int bits, const float* table,
                  std::size_t begin, std::size_t end, bool accumulate, float weight, float* out) {
  const std::size_t stride = static_cast<std::size_t>(bits);
  if (direct_runs(l, bits)) {
    for_each_run(l, begin, end, [&](std::size_t b, std::size_t i, std::size_t len) {
      decode_codes(packed + i * stride / 8, len, bits, table, scales[b], accumulate, weight, out + (i - begin));
    });
    return;
  }
  // Blocks below 8 elements: runs need not start on a byte; unpack segments.
  alignas(64) std::uint8_t codes[kSeg];
  for (std::size_t s = begin; s < end; s += kSeg) {
    const std::size_t e = std::min(end, s + kSeg);
    unpack(packed + s * stride / 8, e - s, bits, codes);
    for_each_run(l, s, e, [&](std::size_t b, std::size_t i, std::size_t len) {
      decode_codes(codes + (i - s), len, 8, table, scales[b], accumulate, weight, out + (i - begin));
    });
  }
}

// --------------------------------------------------------------- quantize --
// The elements [begin, end) of the rotated vector: whole blocks.
struct Range {
  std::size_t begin, end, first_block, end_block;
};

struct Plan {
  RhtLayout layout;
  std::size_t m, task;  // task: elements per range, a multiple of the block and of kSeg
  std::size_t tasks() const { return ceil_div(m, task); }
  Range range(std::size_t t) const {
    const std::size_t begin = t * task, end = std::min(m, begin + task);
    return {begin, end, begin / layout.block, ceil_div(end, layout.block)};
  }
};

Plan make_plan(const RhtLayout& l) { return {l, l.size(), std::max(l.block, kSeg)}; }

// z = (y * pre) * mul. Stochastic: mul = 1 / (s * pre) (so z = y * (1 / s)
// for ordinary norms); nearest: mul = sqrt(L) / (r * pre).
Normaliser normaliser(double r, std::size_t len, EdenRounding rounding, float scale) {
  const float pre = r < kTinyNorm ? 0x1p64f : r > kHugeNorm ? 0x1p-64f : 1.0f;
  if (rounding == EdenRounding::stochastic && std::isnormal(scale * pre)) return {pre, 1.0f / (scale * pre)};
  return {pre, static_cast<float>(std::sqrt(static_cast<double>(len)) / (r * static_cast<double>(pre)))};
}

float checked_scale(double s, std::size_t b) {
  if (!(s <= static_cast<double>(std::numeric_limits<float>::max())))
    throw std::invalid_argument("y: the scale of block " + std::to_string(b) + " overflows float32");
  return static_cast<float>(s);
}

struct QuantizeArgs {
  int bits;
  EdenRounding rounding;
  EdenScale scale;
  std::uint32_t key;
  std::uint8_t* packed;
  float* scales;
};

struct Outliers {
  std::vector<std::uint32_t> idx;
  std::vector<float> val;
};

// Appends the flagged elements of a run (flags[q] != 0) to the outliers,
// testing eight flags at a time.
void collect_outliers(const std::uint8_t* flags, const float* y, std::size_t first, std::size_t len, Outliers& o) {
  auto take = [&](std::size_t j, std::uint64_t word) {
    for (std::size_t q = j; word != 0; ++q, word >>= 8)
      if (word & 0xFF) {
        o.idx.push_back(static_cast<std::uint32_t>(first + q));
        o.val.push_back(y[q]);
      }
  };
  std::size_t j = 0;
  for (; j + 8 <= len; j += 8) {
    std::uint64_t word;
    std::memcpy(&word, flags + j, 8);
    if (word != 0) take(j, word);
  }
  for (; j < len; ++j) take(j, flags[j]);
}

// Quantizes the range's elements; y holds them (y[0] is element r.begin).
void quantize_range(const float* y, const Plan& p, const Range& r, const QuantizeArgs& a, Outliers& outliers) {
  const Tables& t = tables(a.bits);
  const std::size_t nb = r.end_block - r.first_block;
  // Per block: norm, normaliser, running sums. A range holds one block or
  // kSeg elements' worth, so these stay small.
  std::vector<double> norm(nb), norm2(nb);
  std::vector<Normaliser> nms(nb);
  std::vector<NearestSums> sums(nb);
  const bool stochastic = a.rounding == EdenRounding::stochastic;
  for (std::size_t k = 0; k < nb; ++k) {
    const std::size_t b = r.first_block + k, len = p.layout.length(b);
    norm2[k] = sum_squares(y + (p.layout.offset(b) - r.begin), len);
    if (!std::isfinite(norm2[k])) throw std::invalid_argument("y contains NaN or infinity");
    norm[k] = std::sqrt(norm2[k]);
    const float s = stochastic ? checked_scale(norm[k] / std::sqrt(static_cast<double>(len)), b) : 0.0f;
    nms[k] = normaliser(norm[k], len, a.rounding, s);
    if (stochastic) a.scales[b] = s;
  }
  const bool direct = direct_runs(p.layout, a.bits);
  const std::size_t stride = static_cast<std::size_t>(a.bits);
  alignas(64) std::uint8_t codes[kSeg];
  alignas(64) std::uint8_t flags[kSeg];
  for (std::size_t s = r.begin; s < r.end; s += kSeg) {
    const std::size_t e = std::min(r.end, s + kSeg);
    for_each_run(p.layout, s, e, [&](std::size_t b, std::size_t i, std::size_t len) {
      const std::size_t k = b - r.first_block;
      const float* yr = y + (i - r.begin);
      const Sink sink = direct ? Sink::packed : Sink::bytes;
      std::uint8_t* dst = direct ? a.packed + i * stride / 8 : codes + (i - s);
      if (norm[k] == 0.0) {
        std::memset(codes + (i - s), t.half, len);
        if (direct) pack(codes + (i - s), len, a.bits, dst);
      } else if (!stochastic) {
        const NearestSums ns = nearest_codes(yr, len, nms[k], t, a.scale == EdenScale::mse, sink, dst);
        sums[k].dot += ns.dot;
        sums[k].csq += ns.csq;
      } else if (stochastic_codes(yr, len, i, nms[k], t, a.key, sink, dst, flags) != 0) {
        collect_outliers(flags, yr, i, len, outliers);
      }
    });
    if (!direct) pack(codes, e - s, a.bits, a.packed + s * stride / 8);
  }
  if (stochastic) return;
  for (std::size_t k = 0; k < nb; ++k) {
    const std::size_t b = r.first_block + k;
    double s = 0.0;
    if (norm[k] > 0.0) {
      const double per_y = static_cast<double>(nms[k].pre) * static_cast<double>(nms[k].mul);  // z / y
      s = a.scale == EdenScale::mse ? sums[k].dot / per_y / sums[k].csq : norm2[k] * per_y / sums[k].dot;
    }
    a.scales[b] = checked_scale(s, b);
  }
}

// Float workspace for one task: a thread's kept buffer when it is small,
// else its own allocation, freed with the task.
class Scratch {
 public:
  float* get(std::size_t len) {
    if (len > kKeepScratch) {
      own_.resize(len);
      return own_.data();
    }
    thread_local std::vector<float> kept;
    if (kept.size() < len) kept.resize(len);
    return kept.data();
  }

 private:
  std::vector<float> own_;
};

// Runs quantize_range over every range in parallel and appends the outliers
// in range order. fill(range, scratch) returns the range's rotated values.
template <typename Fill>
void quantize_all(const Plan& p, const QuantizeArgs& a, std::vector<std::uint32_t>& outlier_idx,
                  std::vector<float>& outlier_val, Fill&& fill) {
  const std::size_t tasks = p.tasks();
  std::vector<Outliers> found(tasks);
  parallel_for_sized(tasks, p.m, [&](std::size_t task) {
    const Range r = p.range(task);
    Scratch scratch;
    quantize_range(fill(r, scratch), p, r, a, found[task]);
  });
  for (const Outliers& o : found) {
    outlier_idx.insert(outlier_idx.end(), o.idx.begin(), o.idx.end());
    outlier_val.insert(outlier_val.end(), o.val.begin(), o.val.end());
  }
}

// Decodes m elements in parallel chunks of kSeg.
void decode_all(const std::uint8_t* packed, const float* scales, const RhtLayout& l, int bits, EdenRounding rounding,
                bool accumulate, float weight, float* out) {
  const std::size_t m = l.size();
  const float* table = table_of(tables(bits), rounding);
  parallel_for_sized(ceil_div(m, kSeg), m, [&](std::size_t c) {
    const std::size_t begin = c * kSeg;
    decode_range(packed, scales, l, bits, table, begin, std::min(m, begin + kSeg), accumulate, weight, out + begin);
  });
}

// The seeds of a segment's two rotation passes (docs/format.md, "EDEN sections").
struct SegmentSeeds {
  std::uint64_t first, second;
};

SegmentSeeds segment_seeds(std::uint64_t rotation_seed, std::size_t segment) {
  return {stage_seed(rotation_seed, 2 * segment, kPurposeRotation),
          stage_seed(rotation_seed, 2 * segment + 1, kPurposeRotation)};
}

// Undoes both passes over the range's blocks of a segment of `length`, in place
// (w[0] is element r.begin of the segment): the second pass, then the first.
void unrotate_range(float* w, std::size_t length, std::size_t block, const SegmentSeeds& seeds, const Range& r) {
  fwht_signs_blocks_inplace(w, length, block, seeds.second, r.first_block, r.end_block);
  fwht_signs_blocks_inplace(w, length, block, seeds.first, r.first_block, r.end_block);
}

// Runs fn(segment, its seeds, its plan, range) for every range of blocks of every
// segment, a segment's ranges in parallel (the ranges depend on the sizes only).
template <typename Fn>
void for_each_range(const std::vector<EdenSegment>& segments, std::size_t block, std::uint64_t rotation_seed, Fn&& fn) {
  for (std::size_t i = 0; i < segments.size(); ++i) {
    const EdenSegment& g = segments[i];
    const SegmentSeeds seeds = segment_seeds(rotation_seed, i);
    const Plan p = make_plan(rht_layout(g.length, block));
    parallel_for_sized(p.tasks(), p.m, [&](std::size_t task) { fn(g, seeds, p, p.range(task)); });
  }
}

// x[i] *= weight.
FEDPRESS_CLONES
void scale_values(float* x, std::size_t len, float weight) {
  for (std::size_t i = 0; i < len; ++i) x[i] *= weight;
}

// acc[i] += weight * w[i]: a float product then a float sum, as numpy's two steps.
FEDPRESS_CLONES
void add_scaled(float* __restrict acc, const float* __restrict w, std::size_t len, float weight) {
  for (std::size_t i = 0; i < len; ++i) acc[i] += weight * w[i];
}

}  // namespace

bool valid_eden_bits(int bits) { return bits == 1 || bits == 2 || bits == 3 || bits == 4 || bits == 8; }

const float* eden_table(int bits, EdenRounding rounding) {
  return valid_eden_bits(bits) ? table_of(tables(bits), rounding) : nullptr;
}

std::size_t eden_num_blocks(std::size_t n, std::size_t block) { return rht_layout(n, block).blocks(); }

std::size_t eden_packed_size(std::size_t m, int bits) { return code_bytes(m, bits); }

std::uint64_t eden_derived_seed(std::uint64_t rotation_seed) { return hash64(rotation_seed, 0xEDE0u); }

void eden_check_padding(const std::uint8_t* packed, std::size_t m, int bits) {
  check_bits(bits);
  const std::size_t used = (m * static_cast<std::size_t>(bits)) % 8;
  if (used != 0 && (packed[code_bytes(m, bits) - 1] >> used) != 0)
    throw MalformedData("packed: nonzero padding bits in the last byte");
}

void eden_quantize(const float* y, std::size_t m, std::size_t n, std::size_t block, int bits, EdenRounding rounding,
                   EdenScale scale, std::uint64_t seed, std::uint8_t* packed, float* scales,
                   std::vector<std::uint32_t>& outlier_idx, std::vector<float>& outlier_val) {
  const Plan p = make_plan(checked_layout(m, n, block, bits));
  const QuantizeArgs a{bits, rounding, scale, stochastic_key(seed), packed, scales};
  quantize_all(p, a, outlier_idx, outlier_val, [&](const Range& r, Scratch&) { return y + r.begin; });
}

void eden_dequantize(const std::uint8_t* packed, const float* scales, std::size_t m, std::size_t n, std::size_t block,
                     int bits, EdenRounding rounding, float* y_out) {
  const RhtLayout l = checked_layout(m, n, block, bits);
  eden_check_padding(packed, m, bits);
  decode_all(packed, scales, l, bits, rounding, false, 0.0f, y_out);
}

void eden_accumulate(const std::uint8_t* packed, const float* scales, std::size_t m, std::size_t n, std::size_t block,
                     int bits, EdenRounding rounding, float weight, float* acc) {
  const RhtLayout l = checked_layout(m, n, block, bits);
  eden_check_padding(packed, m, bits);
  decode_all(packed, scales, l, bits, rounding, true, weight, acc);
}

std::vector<EdenSegment> eden_segments(std::size_t n, std::size_t block, int bits) {
  check_bits(bits);
  rht_layout(n, block);  // checks the block
  std::vector<EdenSegment> out;
  EdenSegment next{0, 0, 0, 0};
  auto add = [&](std::size_t length) {
    next.length = length;
    out.push_back(next);
    next.offset += length;
    next.scales += length >= block ? length / block : 1;
    next.codes += code_bytes(length, bits);
  };
  if (n >= block) add(n / block * block);
  for (std::size_t tail = n % block; tail != 0;) {
    std::size_t length = 1;
    while (length * 2 <= tail) length *= 2;  // the largest power of two in the tail
    add(length);
    tail -= length;
  }
  return out;
}

std::size_t eden_layout_scales(std::size_t n, std::size_t block) {
  rht_layout(n, block);
  std::size_t scales = n / block;
  for (std::size_t tail = n % block; tail != 0; tail &= tail - 1) ++scales;  // one per set bit
  return scales;
}

std::size_t eden_layout_code_bytes(std::size_t n, std::size_t block, int bits) {
  check_bits(bits);
  rht_layout(n, block);
  std::size_t bytes = code_bytes(n / block * block, bits);
  for (std::size_t tail = n % block; tail != 0; tail &= tail - 1) bytes += code_bytes(tail & (~tail + 1), bits);
  return bytes;
}

void eden_encode(const float* x, std::size_t n, std::size_t block, int bits, EdenRounding rounding, EdenScale scale,
                 std::uint64_t rotation_seed, std::uint64_t quant_seed, std::uint8_t* packed, float* scales,
                 std::vector<std::uint32_t>& outlier_idx, std::vector<float>& outlier_val) {
  const std::vector<EdenSegment> segments = eden_segments(n, block, bits);
  for (std::size_t i = 0; i < segments.size(); ++i) {
    const EdenSegment& g = segments[i];
    const SegmentSeeds seeds = segment_seeds(rotation_seed, i);
    const Plan p = make_plan(rht_layout(g.length, block));
    const QuantizeArgs a{bits,
                         rounding,
                         scale,
                         stochastic_key(stage_seed(quant_seed, i, kPurposeQuantize)),
                         packed + g.codes,
                         scales + g.scales};
    const std::size_t before = outlier_idx.size();
    quantize_all(p, a, outlier_idx, outlier_val, [&](const Range& r, Scratch& scratch) {
      float* w = scratch.get(r.end - r.begin);
      rht_forward_blocks(x + g.offset, g.length, block, seeds.first, r.first_block, r.end_block, w);
      rht_forward_blocks_inplace(w, g.length, block, seeds.second, r.first_block, r.end_block);
      return static_cast<const float*>(w);
    });
    for (std::size_t j = before; j < outlier_idx.size(); ++j) outlier_idx[j] += static_cast<std::uint32_t>(g.offset);
  }
}

void eden_decode(const std::uint8_t* packed, const float* scales, std::size_t n, std::size_t block, int bits,
                 EdenRounding rounding, std::uint64_t rotation_seed, const std::uint32_t* outlier_idx,
                 const float* outlier_val, std::size_t n_outliers, float* out, bool accumulate, float weight) {
  const std::vector<EdenSegment> segments = eden_segments(n, block, bits);
  for (const EdenSegment& g : segments) eden_check_padding(packed + g.codes, g.length, bits);
  for (std::size_t j = 0; j < n_outliers; ++j)
    if (outlier_idx[j] >= n || (j > 0 && outlier_idx[j] <= outlier_idx[j - 1]))
      throw std::invalid_argument("outlier_idx must be strictly ascending and below " + std::to_string(n) + "; entry " +
                                  std::to_string(j) + " is " + std::to_string(outlier_idx[j]));
  const float* table = table_of(tables(bits), rounding);
  const std::uint32_t* idx_end = outlier_idx + n_outliers;
  for_each_range(
      segments, block, rotation_seed,
      [&](const EdenSegment& g, const SegmentSeeds& seeds, const Plan& p, const Range& r) {
        Scratch scratch;
        float* dst = out + g.offset + r.begin;
        float* w = accumulate ? scratch.get(r.end - r.begin) : dst;
        decode_range(packed + g.codes, scales + g.scales, p.layout, bits, table, r.begin, r.end, false, 0.0f, w);
        const std::size_t lo = g.offset + r.begin, hi = g.offset + r.end;
        for (const std::uint32_t* o = std::lower_bound(outlier_idx, idx_end, lo); o != idx_end && *o < hi; ++o)
          w[*o - lo] = outlier_val[o - outlier_idx];
        unrotate_range(w, g.length, block, seeds, r);
        if (accumulate)
          add_scaled(dst, w, r.end - r.begin, weight);
        else if (weight != 1.0f)
          scale_values(dst, r.end - r.begin, weight);
      });
}

double eden_rotation_bound(const float* scales, std::size_t n_scales, int bits, EdenRounding rounding,
                           const float* outlier_val, std::size_t n_outliers, std::size_t n, std::size_t block) {
  if (n == 0) return 0.0;
  const float* table = table_of(tables(bits), rounding);  // symmetric: the first level is the largest
  double largest = n_scales ? static_cast<double>(*std::max_element(scales, scales + n_scales)) *
                                  static_cast<double>(std::fabs(table[0]))
                            : 0.0;
  for (std::size_t j = 0; j < n_outliers; ++j)
    largest = std::max(largest, std::fabs(static_cast<double>(outlier_val[j])));
  return largest * std::pow(static_cast<double>(std::min(block, n)), 1.5);
}

void eden_rotate(float* y, std::size_t n, std::size_t block, std::uint64_t rotation_seed) {
  for_each_range(eden_segments(n, block, 1), block, rotation_seed,
                 [&](const EdenSegment& g, const SegmentSeeds& seeds, const Plan&, const Range& r) {
                   float* w = y + g.offset + r.begin;
                   rht_forward_blocks_inplace(w, g.length, block, seeds.first, r.first_block, r.end_block);
                   rht_forward_blocks_inplace(w, g.length, block, seeds.second, r.first_block, r.end_block);
                 });
}

void eden_rotated_ranges(const float* x, std::size_t n, std::size_t block, std::uint64_t rotation_seed,
                         const std::function<void(std::size_t, const float*, std::size_t)>& fn) {
  for_each_range(eden_segments(n, block, 1), block, rotation_seed,
                 [&](const EdenSegment& g, const SegmentSeeds& seeds, const Plan&, const Range& r) {
                   thread_local std::vector<float> w;
                   w.assign(x + g.offset + r.begin, x + g.offset + r.end);  // segments need no padding
                   rht_forward_blocks_inplace(w.data(), g.length, block, seeds.first, r.first_block, r.end_block);
                   rht_forward_blocks_inplace(w.data(), g.length, block, seeds.second, r.first_block, r.end_block);
                   fn(g.offset + r.begin, w.data(), r.end - r.begin);
                 });
}

void eden_unrotate(float* y, std::size_t n, std::size_t block, std::uint64_t rotation_seed) {
  for_each_range(eden_segments(n, block, 1), block, rotation_seed,
                 [&](const EdenSegment& g, const SegmentSeeds& seeds, const Plan&, const Range& r) {
                   unrotate_range(y + g.offset + r.begin, g.length, block, seeds, r);
                 });
}

}  // namespace fedpress
