// float32 <-> float16 / bfloat16 conversions for the fp16 and bf16 value stages.
// Both round to nearest even and saturate at the largest finite value instead
// of overflowing to infinity (inputs are finite: the codec checks).
#pragma once

#include <cstddef>
#include <cstdint>

namespace fedpress {

// The 16-bit values (n native-endian bit patterns, 2n bytes), read from h or
// written to out, may sit at any address: they usually are a section of a
// payload, at whatever offset it lands. They are read and written with memcpy,
// never through a uint16_t pointer.
void float_to_half(const float* x, std::size_t n, void* out);
void half_to_float(const void* h, std::size_t n, float* out);
void float_to_bfloat16(const float* x, std::size_t n, void* out);
void bfloat16_to_float(const void* h, std::size_t n, float* out);

// A payload's float value section (fp32, fp16 or bf16 values, little-endian, at any
// address) decoded into out (n floats), with its finiteness checked in the same pass:
// returns false when a value is NaN or infinite (out is written in full either way).
enum class FloatCode : int { fp32 = 0, fp16 = 1, bf16 = 2 };
bool decode_floats(FloatCode code, const void* data, std::size_t n, float* out);

// Values of a decoded tensor from which decode_floats streams its fp32 output past the
// caches (16 MiB of float32): nothing reads so large an output back soon.
constexpr std::size_t kStreamingValues = std::size_t{1} << 22;

// decode_floats on the calling thread only (for a caller that splits the work itself).
// streaming: fp32 values go out with non-temporal stores (fenced before it returns), for a
// large output that is not read again soon.
bool decode_floats_serial(FloatCode code, const void* data, std::size_t n, float* out, bool streaming = false);

// Whether n little-endian float32 values at any address are all finite; one thread.
bool floats_finite(const void* data, std::size_t n);

}  // namespace fedpress
