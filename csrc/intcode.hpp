// Linear integer codes (docs/format.md, "Integer sections"): the value stage whose
// codes add up. Clients that share a clip range and a rotation send integer levels
// whose sum (exact, or modulo 2^m under secure aggregation's masks) decodes to the
// sum of their values.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fedpress {

// codes[i] = floor((min(max(x[i], -clip), clip) + clip) / step + u_i), capped at
// 2^bits - 1, with step = 2 clip / (2^bits - 1) and u_i = (hash64(seed, i) >> 11) * 2^-53,
// in double precision: unbiased stochastic rounding to the levels of [-clip, clip].
// Throws std::invalid_argument for bits outside [1, 16], a clip that is not finite and
// positive, or a NaN in x (infinities clip to the range).
void int_encode(const float* x, std::size_t n, int bits, float clip, std::uint64_t seed, std::uint64_t* codes);
// The codes of elements [first, first + n) of a longer vector, whose part x holds (the
// draws u_i follow the global index), on the calling thread.
void int_encode_part(const float* x, std::size_t first, std::size_t n, int bits, float clip, std::uint64_t seed,
                     std::uint64_t* codes);

// int_encode of x rotated as eden_rotate rotates it (block, rotation_seed), a range of
// rotated blocks at a time on the threads: no rotated copy of x. The same codes as
// eden_rotate on a copy, then int_encode.
void int_encode_rotated(const float* x, std::size_t n, int bits, float clip, std::uint64_t seed, std::size_t block,
                        std::uint64_t rotation_seed, std::uint64_t* codes);

constexpr int kMaxWidth = 56;

// Packs n codes of `width` bits (1..kMaxWidth), least significant bit first, into
// ceil(n * width / 8) bytes; the padding bits of the last byte are zero. Throws
// std::invalid_argument when a code does not fit in width bits.
void pack_codes(const std::uint64_t* codes, std::size_t n, int width, std::uint8_t* out);

// Inverse of pack_codes; MalformedData when the padding bits are not zero.
void unpack_codes(const std::uint8_t* in, std::size_t n, int width, std::uint64_t* codes);

// The values of n packed codes, before the inverse rotation, in one pass (no array of
// codes): out[i] = float(((double)t_i * step - offset) * weight), each operation in
// double precision as numpy does it, t_i the code as a signed integer: with
// modulus_bits m (> 0), a residue modulo 2^m, read as t - 2^m from 2^m - 2^(m-2) up (a
// sum pushed below zero by noise), else the code itself. MalformedData as unpack_codes.
void int_values(const std::uint8_t* in, std::size_t n, int width, int modulus_bits, double step, double offset,
                double weight, float* out);

// int_values of n codes given one per uint64 (a sum of codes, its residues modulo 2^m
// with modulus_bits m > 0).
void int_values_of(const std::uint64_t* codes, std::size_t n, int modulus_bits, double step, double offset,
                   double weight, float* out);

}  // namespace fedpress
