// A payload written into one buffer: its pieces in order, the value stages run
// by their kernels straight into their place, then the checksum.
//
// The payload layer (fedpress.format) lays a payload out as a sequence of
// pieces whose sizes it knows before any of them is computed: bytes it has
// already (header, tensor table, small sections), index streams it has planned
// (their Rice parameter and size, plan_rice_streams) and value sections that a
// kernel produces from a float32 vector (q8/q4/q2 codes with their scales, signs
// with theirs, float16 and bfloat16 halves, EDEN sections without outliers).
// assemble() writes every piece into one preallocated buffer, with no
// intermediate copy of a section: the codes go where the payload holds them,
// at whatever offset that is (the float32 scales, few, through an aligned
// buffer). Nothing here knows the payload's grammar beyond the sections' own
// layouts (docs/format.md), which are the kernels'.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace fedpress {

enum class PieceKind : int {
  bytes = 0,             // copy `size` bytes from `data`
  quantize = 1,          // the q8/q4/q2 section of x: ceil(n / bucket) float32 scales, then the packed codes
  half = 2,              // n float16 bit patterns of x
  bfloat16 = 3,          // n bfloat16 bit patterns of x
  eden = 4,              // an EDEN section without outliers: mode byte, scales, codes (eden.hpp's wire layout)
  sign = 5,              // the sign section of x: ceil(n / bucket) float32 mean magnitudes, then one bit per value
  rice = 6,              // the index stream (version 2, ricestream.hpp) of n ascending uint32 indices, as planned
  rotated_quantize = 7,  // the quantize section of rht_forward(x) (rotate.hpp), rotated a piece at a time
  int_codes = 8,         // an intB section's codes, unmasked: x rotated as eden_rotate does, coded, packed `bits` each
  moved = 9,             // copy `size` bytes from `data`, each copied part's pages handed back (pages.hpp): a
                         // buffer the caller made for this payload alone and never reads again
};

struct Piece {
  PieceKind kind = PieceKind::bytes;
  const void* data = nullptr;       // bytes, moved: the bytes; rice: the indices; the others: the float32 vector x
  std::size_t n = 0;                // bytes, moved: the byte count; rice: the indices' count; the others: elements of x
  int bits = 0;                     // quantize, eden; rice: the planned Rice parameter
  std::size_t block = 0;            // quantize, sign: the bucket; eden: the rotation block
  std::uint64_t seed = 0;           // quantize: the rounding seed; eden: the rotation seed; rice: the index space n
  std::uint64_t quant_seed = 0;     // eden
  std::uint8_t mode = 0;            // eden: the section's mode byte (0 or the MSE-scale bit; no outliers)
  std::size_t planned = 0;          // rice: the planned stream size (RicePlan), checked as it is written
  std::size_t rotation_block = 0;   // rotated_quantize, int_codes: the rotation's block
  std::uint64_t rotation_seed = 0;  // rotated_quantize, int_codes: the rotation's seed
  float clip = 0.0f;                // int_codes: the levels' range [-clip, clip]
};

// Bytes a piece occupies. Throws std::invalid_argument on invalid parameters.
std::size_t piece_size(const Piece& piece);

// Writes the pieces in order into out, which holds the sum of their sizes, and
// returns that sum. Throws std::invalid_argument, its message starting with
// "piece <i>: ", when a kernel refuses its input (NaN or infinity; an EDEN
// section whose inverse rotation could leave float32, which the decoder would
// refuse); out is then partly written. With `crc`, it also sets *crc to the CRC-32C
// of what it wrote: where the pieces are spread over the threads, each piece's right
// after its writing, while it is in cache, the CRCs then combined in order.
std::size_t assemble(const std::vector<Piece>& pieces, std::uint8_t* out, std::uint32_t* crc = nullptr);

}  // namespace fedpress
