#include "assemble.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <numeric>
#include <stdexcept>
#include <string>

#include "checksum.hpp"
#include "convert.hpp"
#include "eden.hpp"
#include "intcode.hpp"
#include "pages.hpp"
#include "parallel.hpp"
#include "quantize.hpp"
#include "ricestream.hpp"
#include "rotate.hpp"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "assemble.cpp copies float32 scales as the payload's little-endian bytes"
#endif

namespace fedpress {
namespace {

constexpr std::size_t kCopyChunk = std::size_t{1} << 20;
constexpr std::uint8_t kEdenMseScale = 0x02;  // the mode bit of the MSE scale (docs/format.md)
constexpr double kRotationLimit = 1e38;
// A rotated quantize section is made this many values at a time (a cache-sized part),
// unless its blocks and buckets line up only over more than kMaxRotatedPart.
constexpr std::size_t kRotatedPart = std::size_t{1} << 16;
constexpr std::size_t kMaxRotatedPart = std::size_t{1} << 22;

const float* floats(const Piece& p) { return static_cast<const float*>(p.data); }

// With `discard`, each chunk's pages of src are handed back once copied: the payload's
// pages are faulted in as the source's go, and the two are never resident whole together.
// The chunks then end where src's address is a multiple of kCopyChunk, so that no page
// straddles two chunks (one that did would be handed back by neither).
void copy_bytes(const std::uint8_t* src, std::size_t size, std::uint8_t* out, bool discard = false) {
  const std::size_t head =
      discard ? std::min(size, (kCopyChunk - reinterpret_cast<std::uintptr_t>(src) % kCopyChunk) % kCopyChunk) : 0;
  const std::size_t chunks = (head ? 1 : 0) + ceil_div(size - head, kCopyChunk);
  parallel_for_sized(chunks, size / 4, [&](std::size_t c) {
    const std::size_t begin = head == 0 ? c * kCopyChunk : c == 0 ? 0 : head + (c - 1) * kCopyChunk;
    const std::size_t end = std::min(size, head != 0 && c == 0 ? head : begin + kCopyChunk);
    std::memcpy(out + begin, src + begin, end - begin);
    if (discard) discard_pages(const_cast<std::uint8_t*>(src), begin, end);
  });
}

// A section that starts with `count` float32 scales at `at`, its codes right after them:
// write(codes, scales) makes both, the scales into an aligned buffer (the payload's are at
// any offset), copied to their place once the codes are written.
template <class Write>
void with_scales(std::size_t count, std::uint8_t* at, Write&& write) {
  std::vector<float> scales(count);
  const std::size_t scale_bytes = count * sizeof(float);
  write(at + scale_bytes, scales.data());
  if (scale_bytes != 0) std::memcpy(at, scales.data(), scale_bytes);
}

void write_quantized(const Piece& p, std::uint8_t* out) {
  with_scales(bucket_count(p.n, p.block), out, [&](std::uint8_t* codes, float* scales) {
    quantize(floats(p), p.n, p.bits, p.block, true, p.seed, codes, scales);
  });
}

// The quantize section of the rotated x, a few rotation blocks at a time: each part is
// rotated into a buffer of the thread's own and quantized from there into its place (the
// codes and scales quantize writes of the whole, bit for bit), so no rotated copy of x is
// ever whole. Parts hold whole blocks and whole buckets and start on a byte.
void write_rotated_quantized(const Piece& p, std::uint8_t* out) {
  const RhtLayout layout = rht_layout(p.n, p.rotation_block);
  const std::size_t m = layout.size();
  with_scales(bucket_count(m, p.block), out, [&](std::uint8_t* codes, float* scales) {
    const std::size_t unit = std::lcm(std::lcm(layout.block, p.block), std::size_t{8});
    if (unit > kMaxRotatedPart) {  // buckets that straddle huge blocks: the whole rotation first
      std::vector<float> rotated(m);
      rht_forward(floats(p), p.n, p.rotation_block, p.rotation_seed, rotated.data());
      quantize(rotated.data(), m, p.bits, p.block, true, p.seed, codes, scales);
      return;
    }
    const std::size_t part = unit * std::max<std::size_t>(1, kRotatedPart / unit);
    const std::size_t blocks_per_part = part / layout.block, parts = ceil_div(layout.blocks(), blocks_per_part);
    parallel_for_sized(parts, m, [&](std::size_t i) {
      const SerialScope serial;  // one part per task
      const std::size_t b0 = i * blocks_per_part, b1 = std::min(layout.blocks(), b0 + blocks_per_part);
      const std::size_t first = layout.offset(b0), last = b1 == layout.blocks() ? m : layout.offset(b1);
      thread_local std::vector<float> rotated;
      rotated.resize(last - first);
      rht_forward_blocks(floats(p), p.n, p.rotation_block, p.rotation_seed, b0, b1, rotated.data());
      quantize_part(rotated.data(), first, last - first, m, p.bits, p.block, true, p.seed, codes, scales);
    });
  });
}

// An intB section's codes: x rotated a range of blocks at a time (eden_rotated_ranges),
// each range coded and packed into its place (ranges of segments of 8 values and more
// start and end on a byte, whatever the width); the last n % 8 values, segments shorter
// than 8, are packed together after.
void write_int_codes(const Piece& p, std::uint8_t* out) {
  const std::size_t tail = p.n - p.n % 8;
  std::uint64_t tail_codes[8] = {};
  eden_rotated_ranges(floats(p), p.n, p.rotation_block, p.rotation_seed,
                      [&](std::size_t first, const float* rotated, std::size_t count) {
                        const SerialScope serial;  // one range per task
                        if (first >= tail) {
                          int_encode_part(rotated, first, count, p.bits, p.clip, p.seed, tail_codes + (first - tail));
                          return;
                        }
                        if (first % 8 || count % 8 || first + count > tail)
                          throw std::logic_error("int codes: a range that does not start and end on a byte");
                        thread_local std::vector<std::uint64_t> codes;
                        codes.resize(count);
                        int_encode_part(rotated, first, count, p.bits, p.clip, p.seed, codes.data());
                        pack_codes(codes.data(), count, p.bits, out + first / 8 * static_cast<std::size_t>(p.bits));
                      });
  if (tail < p.n) pack_codes(tail_codes, p.n - tail, p.bits, out + tail / 8 * static_cast<std::size_t>(p.bits));
}

void write_signs(const Piece& p, std::uint8_t* out) {
  with_scales(bucket_count(p.n, p.block), out,
              [&](std::uint8_t* codes, float* scales) { sign_quantize(floats(p), p.n, p.block, codes, scales); });
}

void write_eden(const Piece& p, std::uint8_t* out) {
  const bool mse = (p.mode & kEdenMseScale) != 0;
  const std::size_t count = eden_layout_scales(p.n, p.block);
  out[0] = p.mode;
  with_scales(count, out + 1, [&](std::uint8_t* codes, float* scales) {
    std::vector<std::uint32_t> outlier_idx;  // the nearest rounding has none
    std::vector<float> outlier_val;
    eden_encode(floats(p), p.n, p.block, p.bits, EdenRounding::nearest, mse ? EdenScale::mse : EdenScale::unbiased,
                p.seed, p.quant_seed, codes, scales, outlier_idx, outlier_val);
    // The decoder refuses a section whose inverse rotation could leave float32: never write one.
    const double bound = eden_rotation_bound(scales, count, p.bits, EdenRounding::nearest, nullptr, 0, p.n, p.block);
    if (!(bound <= kRotationLimit))
      throw std::invalid_argument("values too large to rotate in float32 (the decoder's inverse rotation could reach " +
                                  std::to_string(bound) + " > 1e38)");
  });
}

}  // namespace

std::size_t piece_size(const Piece& p) {
  switch (p.kind) {
    case PieceKind::bytes:
    case PieceKind::moved:
      return p.n;
    case PieceKind::quantize:
      if (!valid_bits(p.bits) || p.bits == 1) throw std::invalid_argument("quantize piece: bits must be 2, 4 or 8");
      if (p.block == 0) throw std::invalid_argument("quantize piece: bucket must be positive");
      return bucket_count(p.n, p.block) * sizeof(float) + packed_size(p.n, p.bits);
    case PieceKind::sign:
      if (p.block == 0) throw std::invalid_argument("sign piece: bucket must be positive");
      return bucket_count(p.n, p.block) * sizeof(float) + packed_size(p.n, 1);
    case PieceKind::half:
    case PieceKind::bfloat16:
      return 2 * p.n;
    case PieceKind::rotated_quantize: {
      if (!valid_bits(p.bits) || p.bits == 1)
        throw std::invalid_argument("rotated quantize piece: bits must be 2, 4 or 8");
      if (p.block == 0) throw std::invalid_argument("rotated quantize piece: bucket must be positive");
      if (!valid_rotate_block(p.rotation_block))
        throw std::invalid_argument("rotated quantize piece: the rotation block must be a power of two up to 2^24");
      const std::size_t m = rht_padded_size(p.n, p.rotation_block);
      return bucket_count(m, p.block) * sizeof(float) + packed_size(m, p.bits);
    }
    case PieceKind::int_codes:
      if (p.bits < 1 || p.bits > 16) throw std::invalid_argument("int piece: bits must be in [1, 16]");
      if (!(std::isfinite(p.clip) && p.clip > 0.0f))
        throw std::invalid_argument("int piece: clip must be finite and positive");
      // Blocks of 8 values and more: every range but the last n % 8 values starts on a byte.
      if (!valid_rotate_block(p.rotation_block) || p.rotation_block < 8)
        throw std::invalid_argument("int piece: the rotation block must be a power of two in [8, 2^24]");
      return packed_size(p.n, p.bits);  // (the formula holds for any width)
    case PieceKind::rice:
      if (p.bits < 0 || p.bits > static_cast<int>(kMaxRiceParameter))
        throw std::invalid_argument("rice piece: the parameter must be in [0, 31]");
      return p.planned;
    case PieceKind::eden:
      if (p.mode & ~kEdenMseScale)
        throw std::invalid_argument("eden piece: only the mode bit 0x02 (MSE scale) is allowed");
      return 1 + eden_layout_scales(p.n, p.block) * sizeof(float) + eden_layout_code_bytes(p.n, p.block, p.bits);
  }
  throw std::invalid_argument("unknown piece kind " + std::to_string(static_cast<int>(p.kind)));
}

namespace {

void write_piece(const Piece& p, std::size_t size, std::uint8_t* out) {
  switch (p.kind) {
    case PieceKind::bytes:
      copy_bytes(static_cast<const std::uint8_t*>(p.data), size, out);
      break;
    case PieceKind::moved:
      copy_bytes(static_cast<const std::uint8_t*>(p.data), size, out, /*discard=*/true);
      break;
    case PieceKind::quantize:
      write_quantized(p, out);
      break;
    case PieceKind::half:
      float_to_half(floats(p), p.n, out);
      break;
    case PieceKind::bfloat16:
      float_to_bfloat16(floats(p), p.n, out);
      break;
    case PieceKind::eden:
      write_eden(p, out);
      break;
    case PieceKind::sign:
      write_signs(p, out);
      break;
    case PieceKind::rotated_quantize:
      write_rotated_quantized(p, out);
      break;
    case PieceKind::int_codes:
      write_int_codes(p, out);
      break;
    case PieceKind::rice:
      write_rice_stream(static_cast<const std::uint32_t*>(p.data), p.n, p.seed,
                        RicePlan{static_cast<unsigned>(p.bits), p.planned}, out);
      break;
  }
}

}  // namespace

std::size_t assemble(const std::vector<Piece>& pieces, std::uint8_t* out, std::uint32_t* crc) {
  std::vector<std::size_t> at(pieces.size() + 1, 0);
  std::size_t largest = 0;
  for (std::size_t i = 0; i < pieces.size(); ++i) try {
      const std::size_t size = piece_size(pieces[i]);
      at[i + 1] = at[i] + size;
      largest = std::max(largest, size);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument("piece " + std::to_string(i) + ": " + e.what());
    }
  const auto write = [&](std::size_t i) {
    try {
      write_piece(pieces[i], at[i + 1] - at[i], out + at[i]);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument("piece " + std::to_string(i) + ": " + e.what());
    }
  };
  // A model's many tensors: the pieces are spread over the threads, each written by one
  // (its kernel split again would put both threads in the same fresh pages, and a small
  // piece's kernel runs on one thread anyway). One piece that is most of the payload:
  // the pieces in order, each kernel splitting its own.
  if (pieces.size() > 1 && 2 * largest < at.back() && at.back() >= kParallelThreshold) {
    // Largest first, each task taking the largest piece left, whichever task it is: the
    // threads then end on small pieces, together (in table order, a thread could start a
    // layer's kernel as the other finished, and leave it waiting for most of it).
    std::vector<std::size_t> order(pieces.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(),
                     [&](std::size_t a, std::size_t b) { return at[a + 1] - at[a] > at[b + 1] - at[b]; });
    std::atomic<std::size_t> next{0};
    // Each piece's refusal is kept, and the first piece's in order is raised: the same
    // message whatever the threads (parallel_for would raise the first in time).
    std::vector<std::exception_ptr> errors(pieces.size());
    std::vector<std::uint32_t> crcs(crc ? pieces.size() : 0), shifts(crcs.size());
    parallel_for(pieces.size(), [&](std::size_t) {
      const std::size_t i = order[next.fetch_add(1, std::memory_order_relaxed)];
      const SerialScope serial;
      try {
        write(i);
      } catch (...) {
        errors[i] = std::current_exception();
        return;
      }
      if (crc) {
        crcs[i] = crc32c(out + at[i], at[i + 1] - at[i]);
        shifts[i] = crc32c_shift(at[i + 1] - at[i]);
      }
    });
    for (const std::exception_ptr& error : errors)
      if (error) std::rethrow_exception(error);
    if (crc) {
      *crc = 0;  // of nothing
      for (std::size_t i = 0; i < crcs.size(); ++i) *crc = crc32c_combine(*crc, crcs[i], shifts[i]);
    }
  } else {
    for (std::size_t i = 0; i < pieces.size(); ++i) write(i);
    if (crc) *crc = crc32c(out, at.back());
  }
  return at.back();
}

}  // namespace fedpress
