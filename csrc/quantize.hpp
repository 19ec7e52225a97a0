// Bucketed max-abs quantization to 1, 2, 4 or 8 bits, and its inverse.
//
// Each bucket of `bucket` consecutive elements has one float32 scale s = max|x|.
// Codes j in [0, L], L = 2^bits - 1, stand for the symmetric grid
//   value(j) = s * (2j - L) / L,
// i.e. 2^bits evenly spaced points from -s to +s (for 1 bit: -s and +s).
// Stochastic rounding picks one of the two neighbouring points with
// probabilities that make the estimate unbiased; nearest rounding picks the
// closer one. Codes are packed little-endian: element i occupies bits
// [i*bits, (i+1)*bits) of the byte stream, least significant bit first, so the
// packed size is exactly ceil(n * bits / 8) bytes; unused high bits of the last
// byte are zero.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace fedpress {

// The grid point (2j - L) / L of code j, as a float division of two exactly representable
// integers: correctly rounded, so a table of them holds the same bits. The one definition
// dequantize and the streaming add (a quantized index stream) share.
inline float grid_point(int code, int levels) {
  return static_cast<float>(2 * code - levels) / static_cast<float>(levels);
}

bool valid_bits(int bits);
std::size_t packed_size(std::size_t n, int bits);
std::size_t bucket_count(std::size_t n, std::size_t bucket);

// packed: packed_size(n, bits) bytes; scales: bucket_count(n, bucket) floats.
// Throws std::invalid_argument when x holds a NaN or an infinity.
void quantize(const float* x, std::size_t n, int bits, std::size_t bucket, bool stochastic, std::uint64_t seed,
              std::uint8_t* packed, float* scales);
// The codes and scales of elements [first, first + count) of an n-element vector whose
// part x holds (x[0] is element first), into the whole vector's packed and scales: what
// quantize of the whole writes there, bit for bit (the stochastic draws follow the global
// index). first is a multiple of the bucket and of 8; first + count a multiple of the
// bucket, or n. For a kernel that makes the vector a piece at a time (a rotation).
void quantize_part(const float* x, std::size_t first, std::size_t count, std::size_t n, int bits, std::size_t bucket,
                   bool stochastic, std::uint64_t seed, std::uint8_t* packed, float* scales);

// The sign stage: one bit per value, 1 for x_i >= 0 (packed LSB first, like 1-bit
// codes), and per bucket the mean |x_i| as its scale: the float64 sum |x_s| +
// pairwise(|x_s+1..e|) in numpy's order (so the scale is np.add.reduceat's, bit for
// bit) divided by the bucket's count, rounded to float32. Dequantized with 1 bit,
// code 1 is +scale and code 0 is -scale. packed: ceil(n / 8) bytes, the unused high
// bits of the last byte zero; scales: bucket_count(n, bucket) floats. Throws
// std::invalid_argument when x holds a NaN or an infinity.
void sign_quantize(const float* x, std::size_t n, std::size_t bucket, std::uint8_t* packed, float* scales);

// out: n floats, out[i] = weight * value_i (exactly value_i for a weight of 1);
// accumulate: out[i] += weight * value_i instead (a float product, then a float
// sum: numpy's two steps, bit for bit).
void dequantize(const std::uint8_t* packed, const float* scales, int bits, std::size_t n, std::size_t bucket,
                float* out, bool accumulate = false, float weight = 1.0f);

// Several dequantizations in one parallel pass (a payload's tensors), each as above.
struct DequantizeJob {
  const std::uint8_t* packed;
  const float* scales;
  int bits;
  std::size_t n, bucket;
  float* out;
  bool accumulate;
  float weight;
};
void dequantize_many(const std::vector<DequantizeJob>& jobs);

// Elements [begin, end) of one dequantization, on the calling thread (a caller that
// spreads its own work, such as a checksum decoding on the way); begin is a multiple of
// 8, so that it starts on a byte of packed. The job is not checked.
void dequantize_range(const DequantizeJob& job, std::size_t begin, std::size_t end);

}  // namespace fedpress
