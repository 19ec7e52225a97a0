#include "quantize.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "parallel.hpp"
#include "rng.hpp"
#include "simd.hpp"

namespace fedpress {
namespace {

constexpr std::uint32_t kAbsMask = 0x7FFFFFFFu;
constexpr std::uint32_t kInfBits = 0x7F800000u;
constexpr std::size_t kTargetChunk = std::size_t{1} << 16;

inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// max |x| over [begin, end) as the bit pattern of the absolute value. For
// non-NaN floats the order of |x| equals the order of these integers, and an
// integer max vectorises without -ffast-math; any NaN/inf yields >= kInfBits.
FEDPRESS_CLONES
std::uint32_t max_abs_bits(const float* x, std::size_t len) {
  std::uint32_t m = 0;
  for (std::size_t i = 0; i < len; ++i) {
    std::uint32_t u;
    std::memcpy(&u, x + i, sizeof u);
    u &= kAbsMask;
    m = u > m ? u : m;
  }
  return m;
}

// Stochastic codes for one bucket segment. Element g (global index) draws its
// uniform from 16 bits of hash32(key, g / 2): the low half for even g, the
// high half for odd g, so one hash serves two elements and the value depends
// only on (seed, g), never on how the work was split. 16 bits of randomness
// leave a rounding bias below 2^-17 of a grid step.
FEDPRESS_CLONES
void codes_stochastic_pairs(const float* x, std::size_t pairs, float pre, float mul, float half, std::uint32_t levels,
                            std::uint32_t key, std::uint32_t first_pair, std::uint8_t* codes) {
  const int top = static_cast<int>(levels);
  for (std::size_t j = 0; j < pairs; ++j) {
    const std::uint32_t h = hash32(key, first_pair + static_cast<std::uint32_t>(j));
    const float u0 = static_cast<float>(h & 0xFFFFu) * 0x1p-16f;
    const float u1 = static_cast<float>(h >> 16) * 0x1p-16f;
    int j0 = static_cast<int>((x[2 * j] * pre) * mul + half + u0);  // >= 0 up to rounding: truncation is floor
    int j1 = static_cast<int>((x[2 * j + 1] * pre) * mul + half + u1);
    j0 = j0 < 0 ? 0 : (j0 > top ? top : j0);
    j1 = j1 < 0 ? 0 : (j1 > top ? top : j1);
    codes[2 * j] = static_cast<std::uint8_t>(j0);
    codes[2 * j + 1] = static_cast<std::uint8_t>(j1);
  }
}

// 4-bit codes written straight into packed bytes (two per byte), for segments
// that start on an even element: the codes never round-trip through a buffer.
// Same values as codes_stochastic_pairs / codes_nearest followed by pack_codes.
FEDPRESS_CLONES
void pack4_stochastic(const float* x, std::size_t pairs, float pre, float mul, float half, std::uint32_t key,
                      std::uint32_t first_pair, std::uint8_t* out) {
  for (std::size_t j = 0; j < pairs; ++j) {
    const std::uint32_t h = hash32(key, first_pair + static_cast<std::uint32_t>(j));
    const float u0 = static_cast<float>(h & 0xFFFFu) * 0x1p-16f;
    const float u1 = static_cast<float>(h >> 16) * 0x1p-16f;
    int j0 = static_cast<int>((x[2 * j] * pre) * mul + half + u0);
    int j1 = static_cast<int>((x[2 * j + 1] * pre) * mul + half + u1);
    j0 = j0 < 0 ? 0 : (j0 > 15 ? 15 : j0);
    j1 = j1 < 0 ? 0 : (j1 > 15 ? 15 : j1);
    out[j] = static_cast<std::uint8_t>(j0 | (j1 << 4));
  }
}

FEDPRESS_CLONES
void pack4_nearest(const float* x, std::size_t pairs, float pre, float mul, float half, std::uint8_t* out) {
  for (std::size_t j = 0; j < pairs; ++j) {
    int j0 = static_cast<int>((x[2 * j] * pre) * mul + half + 0.5f);
    int j1 = static_cast<int>((x[2 * j + 1] * pre) * mul + half + 0.5f);
    j0 = j0 < 0 ? 0 : (j0 > 15 ? 15 : j0);
    j1 = j1 < 0 ? 0 : (j1 > 15 ? 15 : j1);
    out[j] = static_cast<std::uint8_t>(j0 | (j1 << 4));
  }
}

// Same values as codes_stochastic_pairs for segments with odd ends.
void codes_stochastic(const float* x, std::size_t len, float pre, float mul, float half, std::uint32_t levels,
                      std::uint32_t key, std::size_t first, std::uint8_t* codes) {
  std::size_t i = 0;
  auto one = [&](std::size_t k) {
    const std::size_t g = first + k;
    const std::uint32_t h = hash32(key, static_cast<std::uint32_t>(g >> 1));
    const float u = static_cast<float>((g & 1) ? (h >> 16) : (h & 0xFFFFu)) * 0x1p-16f;
    int j = static_cast<int>((x[k] * pre) * mul + half + u);
    j = j < 0 ? 0 : (j > static_cast<int>(levels) ? static_cast<int>(levels) : j);
    codes[k] = static_cast<std::uint8_t>(j);
  };
  if (first & 1) one(i++);
  const std::size_t pairs = (len - i) / 2;
  codes_stochastic_pairs(x + i, pairs, pre, mul, half, levels, key, static_cast<std::uint32_t>((first + i) >> 1),
                         codes + i);
  for (i += 2 * pairs; i < len; ++i) one(i);
}

FEDPRESS_CLONES
void codes_nearest(const float* x, std::size_t len, float pre, float mul, float half, std::uint32_t levels,
                   std::uint8_t* codes) {
  const int top = static_cast<int>(levels);
  for (std::size_t i = 0; i < len; ++i) {
    const float t = (x[i] * pre) * mul + half;
    int j = static_cast<int>(t + 0.5f);
    j = j < 0 ? 0 : (j > top ? top : j);
    codes[i] = static_cast<std::uint8_t>(j);
  }
}

// Packs len codes (len a multiple of 8 except for the very last chunk) into
// ceil(len*bits/8) bytes.
FEDPRESS_CLONES
void pack_codes(const std::uint8_t* codes, std::size_t len, int bits, std::uint8_t* out) {
  const std::size_t full = len / 8;  // groups of 8 codes = `bits` bytes
  switch (bits) {
    case 8:
      std::memcpy(out, codes, len);
      return;
    case 4:
      for (std::size_t i = 0; i < full * 4; ++i)
        out[i] = static_cast<std::uint8_t>(codes[2 * i] | (codes[2 * i + 1] << 4));
      break;
    case 2:
      for (std::size_t i = 0; i < full * 2; ++i)
        out[i] = static_cast<std::uint8_t>(codes[4 * i] | (codes[4 * i + 1] << 2) | (codes[4 * i + 2] << 4) |
                                           (codes[4 * i + 3] << 6));
      break;
    default:  // 1
      for (std::size_t i = 0; i < full; ++i) {
        const std::uint8_t* c = codes + 8 * i;
        out[i] = static_cast<std::uint8_t>(c[0] | (c[1] << 1) | (c[2] << 2) | (c[3] << 3) | (c[4] << 4) | (c[5] << 5) |
                                           (c[6] << 6) | (c[7] << 7));
      }
      break;
  }
  // Tail (only in the last chunk): zero the remaining bytes, then OR codes in.
  const std::size_t done_codes = full * 8;
  const std::size_t tail_bytes = packed_size(len, bits) - full * static_cast<std::size_t>(bits);
  std::uint8_t* tail = out + full * static_cast<std::size_t>(bits);
  std::memset(tail, 0, tail_bytes);
  for (std::size_t i = done_codes; i < len; ++i) {
    const std::size_t bit = (i - done_codes) * static_cast<std::size_t>(bits);
    tail[bit / 8] = static_cast<std::uint8_t>(tail[bit / 8] | (codes[i] << (bit % 8)));
  }
}

// Inverse of pack_codes for a run that starts on a byte boundary.
FEDPRESS_CLONES
void unpack_codes(const std::uint8_t* packed, std::size_t len, int bits, std::uint8_t* codes) {
  const std::size_t full = len / 8;
  switch (bits) {
    case 8:
      std::memcpy(codes, packed, len);
      return;
    case 4:
      for (std::size_t i = 0; i < full * 4; ++i) {
        codes[2 * i] = packed[i] & 15;
        codes[2 * i + 1] = static_cast<std::uint8_t>(packed[i] >> 4);
      }
      break;
    case 2:
      for (std::size_t i = 0; i < full * 2; ++i)
        for (int j = 0; j < 4; ++j) codes[4 * i + j] = (packed[i] >> (2 * j)) & 3;
      break;
    default:
      for (std::size_t i = 0; i < full; ++i)
        for (int j = 0; j < 8; ++j) codes[8 * i + j] = (packed[i] >> j) & 1;
      break;
  }
  const unsigned mask = (1u << bits) - 1u;
  const std::uint8_t* tail = packed + full * static_cast<std::size_t>(bits);
  for (std::size_t i = full * 8; i < len; ++i) {
    const std::size_t bit = (i - full * 8) * static_cast<std::size_t>(bits);
    codes[i] = static_cast<std::uint8_t>((tail[bit / 8] >> (bit % 8)) & mask);
  }
}

// value(j) = scale * grid_point(j): computed here, not looked up, so that the loop vectorises.
FEDPRESS_CLONES
void scale_codes(const std::uint8_t* codes, std::size_t len, int levels, float scale, float weight, float* out) {
  // weight * v: exactly v for a weight of 1.
  for (std::size_t i = 0; i < len; ++i) out[i] = weight * (scale * grid_point(codes[i], levels));
}

// out[i] += weight * (the value scale_codes writes).
FEDPRESS_CLONES
void scale_codes_add(const std::uint8_t* codes, std::size_t len, int levels, float scale, float weight, float* out) {
  for (std::size_t i = 0; i < len; ++i) out[i] += weight * (scale * grid_point(codes[i], levels));
}

std::size_t chunk_elements(std::size_t bucket) {
  // A chunk covers whole buckets and starts on a byte boundary for every bit
  // width (a multiple of 8 elements), so chunks pack independently.
  const std::size_t unit = std::lcm(bucket, std::size_t{8});
  if (unit > (std::size_t{1} << 20)) return 0;  // huge buckets: scales first, then codes
  return unit * std::max<std::size_t>(1, kTargetChunk / unit);
}

// numpy's pairwise float64 sum of |x[0..n)| (the order of its add.reduce on a
// contiguous array): below 8 values in turn, up to 128 with eight accumulators,
// beyond that the two halves (cut at a multiple of 8) recursively.
double pairwise_abs_sum(const float* x, std::size_t n) {
  if (n < 8) {
    double r = 0.0;
    for (std::size_t i = 0; i < n; ++i) r += std::fabs(static_cast<double>(x[i]));
    return r;
  }
  if (n <= 128) {
    double r[8];
    for (std::size_t j = 0; j < 8; ++j) r[j] = std::fabs(static_cast<double>(x[j]));
    std::size_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (std::size_t j = 0; j < 8; ++j) r[j] += std::fabs(static_cast<double>(x[i + j]));
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += std::fabs(static_cast<double>(x[i]));
    return res;
  }
  std::size_t half = n / 2;
  half -= half % 8;
  return pairwise_abs_sum(x, half) + pairwise_abs_sum(x + half, n - half);
}

FEDPRESS_CLONES
void pack_signs(const float* x, std::size_t n, std::uint8_t* out) {
  for (std::size_t i = 0; i < n / 8; ++i) {
    unsigned byte = 0;
    for (unsigned j = 0; j < 8; ++j) byte |= static_cast<unsigned>(x[8 * i + j] >= 0.0f) << j;
    out[i] = static_cast<std::uint8_t>(byte);
  }
  if (n % 8) {
    unsigned byte = 0;
    for (std::size_t j = 0; j < n % 8; ++j) byte |= static_cast<unsigned>(x[n / 8 * 8 + j] >= 0.0f) << j;
    out[n / 8] = static_cast<std::uint8_t>(byte);
  }
}

}  // namespace

void sign_quantize(const float* x, std::size_t n, std::size_t bucket, std::uint8_t* packed, float* scales) {
  if (bucket == 0) throw std::invalid_argument("bucket must be positive");
  // Chunks of whole buckets starting on byte boundaries (see chunk_elements); huge
  // buckets: one chunk per bucket, each starting at a multiple of 8 only if the bucket is.
  std::size_t chunk = chunk_elements(bucket);
  if (chunk == 0) chunk = std::lcm(bucket, std::size_t{8});
  std::atomic<bool> non_finite{false};
  parallel_for_sized(ceil_div(n, chunk), n, [&](std::size_t c) {
    const std::size_t begin = c * chunk, end = std::min(n, begin + chunk);
    for (std::size_t s = begin; s < end; s += bucket) {
      const std::size_t e = std::min(n, s + bucket);
      // np.add.reduceat: the first value, then the pairwise sum of the rest.
      const double sum = std::fabs(static_cast<double>(x[s])) + pairwise_abs_sum(x + s + 1, e - s - 1);
      if (!std::isfinite(sum)) non_finite.store(true, std::memory_order_relaxed);
      scales[s / bucket] = static_cast<float>(sum / static_cast<double>(e - s));
    }
    pack_signs(x + begin, end - begin, packed + begin / 8);
  });
  if (non_finite.load()) throw std::invalid_argument("x contains NaN or infinity");
}

bool valid_bits(int bits) { return bits == 1 || bits == 2 || bits == 4 || bits == 8; }

std::size_t packed_size(std::size_t n, int bits) {
  return (n / 8) * static_cast<std::size_t>(bits) + ceil_div((n % 8) * static_cast<std::size_t>(bits), 8);
}

std::size_t bucket_count(std::size_t n, std::size_t bucket) { return ceil_div(n, bucket); }

void quantize(const float* x, std::size_t n, int bits, std::size_t bucket, bool stochastic, std::uint64_t seed,
              std::uint8_t* packed, float* scales) {
  quantize_part(x, 0, n, n, bits, bucket, stochastic, seed, packed, scales);
}

void quantize_part(const float* x, std::size_t first, std::size_t count, std::size_t n, int bits, std::size_t bucket,
                   bool stochastic, std::uint64_t seed, std::uint8_t* packed, float* scales) {
  if (!valid_bits(bits)) throw std::invalid_argument("bits must be 1, 2, 4 or 8");
  if (bucket == 0) throw std::invalid_argument("bucket must be positive");
  const std::size_t last = first + count;
  if (first % bucket || first % 8 || last > n || (last != n && last % bucket))
    throw std::invalid_argument("a part starts on a bucket and a byte, and ends on a bucket or at n");
  if (count == 0) return;
  const std::uint32_t levels = (1u << bits) - 1u;
  const float half = static_cast<float>(levels) * 0.5f;
  const std::uint32_t key = static_cast<std::uint32_t>(hash64(seed, 0x71u));
  std::atomic<bool> non_finite{false};

  // The affine map of a bucket onto code space: t = (x * pre) * mul + half.
  // half / scale overflows for scales below ~4e-37 (down to subnormals): then
  // both x and the scale are first multiplied by 2^100, exactly.
  struct GridMap {
    float pre, mul;
  };
  auto grid_map = [&](float scale) {
    const float pre = scale < 0x1p-100f ? 0x1p100f : 1.0f;
    return GridMap{pre, scale > 0.f ? half / (scale * pre) : 0.f};
  };
  // Scales of the buckets starting in [begin, end) (each whole bucket).
  auto compute_scales = [&](std::size_t begin, std::size_t end) {
    for (std::size_t s = begin; s < end; s += bucket) {
      const std::size_t e = std::min(last, s + bucket);
      const std::uint32_t m = max_abs_bits(x + (s - first), e - s);
      if (m >= kInfBits) non_finite.store(true, std::memory_order_relaxed);
      scales[s / bucket] = bits_float(m);
    }
  };

  auto code_range = [&](std::size_t begin, std::size_t end, std::uint8_t* codes) {
    // Codes for [begin, end), bucket by bucket; scales already known or computed here.
    for (std::size_t s = begin; s < end;) {
      const std::size_t b = s / bucket;
      const std::size_t e = std::min(end, (b + 1) * bucket);
      const GridMap g = grid_map(scales[b]);
      if (stochastic)
        codes_stochastic(x + (s - first), e - s, g.pre, g.mul, half, levels, key, s, codes + (s - begin));
      else
        codes_nearest(x + (s - first), e - s, g.pre, g.mul, half, levels, codes + (s - begin));
      s = e;
    }
  };

  std::size_t chunk = chunk_elements(bucket);
  const bool fused = chunk != 0;
  if (!fused) {
    // Buckets too large to keep a whole one per chunk: compute scales first.
    parallel_for_sized(bucket_count(count, bucket), count,
                       [&](std::size_t b) { compute_scales(first + b * bucket, first + b * bucket + 1); });
    if (non_finite.load()) throw std::invalid_argument("x contains NaN or infinity");
    chunk = kTargetChunk;
  }
  const std::size_t n_chunks = ceil_div(count, chunk);
  parallel_for_sized(n_chunks, count, [&](std::size_t c) {
    thread_local std::vector<std::uint8_t> codes;
    const std::size_t begin = first + c * chunk, end = std::min(last, begin + chunk);
    codes.resize(end - begin);
    if (fused) compute_scales(begin, end);  // chunks cover whole buckets
    std::uint8_t* out = packed + begin / 8 * static_cast<std::size_t>(bits);
    if (bits == 8) {
      code_range(begin, end, out);  // one code per byte: no packing step
    } else if (bits == 4 && bucket % 2 == 0) {
      // Every segment starts on an even element: pack while coding. A last
      // odd element (only at the very end of x) goes through the generic path.
      const std::size_t even_end = begin + ((end - begin) & ~std::size_t{1});
      for (std::size_t s = begin; s < even_end;) {
        const std::size_t b = s / bucket;
        const std::size_t e = std::min(even_end, (b + 1) * bucket);
        const GridMap g = grid_map(scales[b]);
        if (stochastic)
          pack4_stochastic(x + (s - first), (e - s) / 2, g.pre, g.mul, half, key, static_cast<std::uint32_t>(s >> 1),
                           packed + s / 2);
        else
          pack4_nearest(x + (s - first), (e - s) / 2, g.pre, g.mul, half, packed + s / 2);
        s = e;
      }
      if (even_end < end) {
        code_range(even_end, end, codes.data());
        packed[even_end / 2] = codes[0];
      }
    } else {
      code_range(begin, end, codes.data());
      pack_codes(codes.data(), end - begin, bits, out);
    }
  });
  if (non_finite.load()) throw std::invalid_argument("x contains NaN or infinity");
}

namespace {

// Chunk c (kTargetChunk elements) of one dequantization.
void dequantize_chunk(const DequantizeJob& job, std::size_t c) {
  const std::size_t begin = c * kTargetChunk;
  dequantize_range(job, begin, std::min(job.n, begin + kTargetChunk));
}

void check_job(const DequantizeJob& job) {
  if (!valid_bits(job.bits)) throw std::invalid_argument("bits must be 1, 2, 4 or 8");
  if (job.bucket == 0) throw std::invalid_argument("bucket must be positive");
}

}  // namespace

void dequantize_range(const DequantizeJob& job, std::size_t begin, std::size_t end) {
  thread_local std::vector<std::uint8_t> codes;
  const int levels = (1 << job.bits) - 1;
  codes.resize(end - begin);
  // A range starts at a multiple of 8 elements, hence on a byte boundary.
  unpack_codes(job.packed + begin / 8 * static_cast<std::size_t>(job.bits), end - begin, job.bits, codes.data());
  for (std::size_t s = begin; s < end;) {
    const std::size_t b = s / job.bucket;
    const std::size_t e = std::min(end, (b + 1) * job.bucket);
    if (job.accumulate)
      scale_codes_add(codes.data() + (s - begin), e - s, levels, job.scales[b], job.weight, job.out + s);
    else
      scale_codes(codes.data() + (s - begin), e - s, levels, job.scales[b], job.weight, job.out + s);
    s = e;
  }
}

void dequantize(const std::uint8_t* packed, const float* scales, int bits, std::size_t n, std::size_t bucket,
                float* out, bool accumulate, float weight) {
  dequantize_many({DequantizeJob{packed, scales, bits, n, bucket, out, accumulate, weight}});
}

void dequantize_many(const std::vector<DequantizeJob>& jobs) {
  // One task per chunk of every job, in order: the threads take contiguous runs of them,
  // so that outputs laid out back to back (a model's tensors) are written in two halves,
  // not alternately (which would fault every fresh page from both threads).
  std::vector<std::pair<std::size_t, std::size_t>> tasks;  // (job, chunk)
  std::size_t total = 0;
  for (std::size_t j = 0; j < jobs.size(); ++j) {
    check_job(jobs[j]);
    for (std::size_t c = 0; c < ceil_div(jobs[j].n, kTargetChunk); ++c) tasks.emplace_back(j, c);
    total += jobs[j].n;
  }
  parallel_for_sized(tasks.size(), total,
                     [&](std::size_t t) { dequantize_chunk(jobs[tasks[t].first], tasks[t].second); });
}

}  // namespace fedpress
