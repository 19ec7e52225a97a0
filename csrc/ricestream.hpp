// The version 2 index stream: strictly ascending indices in [0, n) as a split Rice
// code (docs/format.md, "Index stream").
//
//   count  LEB128 varint                k, k <= n
//   l      one byte                     Rice parameter, 0 <= l <= 31        (absent when k == 0)
//   lows   ceil(k*l/8) bytes            the low l bits of each gap, field i at bits [i*l, (i+1)*l),
//                                       LSB-first; padding bits zero
//   unary  every byte left (>= 1)       gap i's quotient g_i >> l as that many zero bits and a one,
//                                       LSB-first; the stream ends with the byte holding the k-th one,
//                                       its padding zero
// Gaps as in version 1 (indexcode.hpp): g_0 = idx_0, g_i = idx_i - idx_{i-1} - 1.
//
// Why split: version 1 interleaves each Golomb code's unary and binary parts, so a
// decoder learns where a code starts only by decoding the one before, a chain of
// dependent loads and shifts (about 4 ns an index). Here the unary parts form a bitmap a
// decoder scans a 64-bit word at a time (count trailing zeros, clear the lowest set bit)
// and the low bits a fixed-width array, so no index waits for the previous one's
// position, and a stream is checked (its count, its last index, its padding) from
// popcounts and the sum of its low bits without decoding it. Every decoded gap is >= 0,
// so a checked stream's indices are strictly ascending and below n by construction: a
// fused decoder adds them to an accumulator with no further check, and can start at any
// checkpoint the check recorded, which is how threads split one stream.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "errors.hpp"

namespace fedpress {

constexpr unsigned kMaxRiceParameter = 31;

// A stream as it will be written, decided before any of it is: its Rice parameter and
// its size in bytes (a payload's table, which precedes the streams, holds the size).
struct RicePlan {
  unsigned parameter = 0;
  std::size_t size = 0;
};

// The plan of the stream of these indices: the parameter that codes them in the fewest
// bits. Throws std::invalid_argument if indices are not strictly ascending or >= n.
RicePlan plan_rice_stream(const std::uint32_t* indices, std::size_t k, std::uint64_t n);
// plan_rice_stream of many index arrays (a model's sparse tensors), spread over the
// threads; a refusal names its array ("array i: ..."), the first in order.
std::vector<RicePlan> plan_rice_streams(const std::vector<const std::uint32_t*>& indices,
                                        const std::vector<std::size_t>& counts,
                                        const std::vector<std::uint64_t>& sizes);
// Writes the stream of the plan into out (plan.size bytes, any content before), having
// checked the indices again (ascending, < n) and that they code in plan.size bytes with
// that parameter: std::invalid_argument, with nothing written, for a plan that is not
// theirs, so that a writer never leaves its buffer.
void write_rice_stream(const std::uint32_t* indices, std::size_t k, std::uint64_t n, const RicePlan& plan,
                       std::uint8_t* out);

// The whole stream of these indices: plan_rice_stream, then write_rice_stream.
std::vector<std::uint8_t> encode_rice_stream(const std::uint32_t* indices, std::size_t k, std::uint64_t n);

// The decoder's state before index i: where to resume scanning the unary part (one bit
// past the previous index's one) and the smallest value index i may take.
struct RiceCheckpoint {
  std::uint64_t i = 0, bit = 0, next = 0;
};

class RiceCursor;

// A stream whose structure was checked (the constructor throws MalformedData naming
// what is wrong). It points into the caller's buffer, which must outlive it.
class RiceStream {
 public:
  // Entries between checkpoints (a multiple of 8); each checkpoint is an index from
  // which a thread can start, so this bounds the work a thread spends skipping to its part.
  static constexpr std::uint64_t kCheckpointEvery = 4096;

  // max_count: refuse larger counts before anything is allocated. With checkpoints,
  // records one every kCheckpointEvery indices (for seek).
  RiceStream(const std::uint8_t* data, std::size_t size, std::uint64_t n, std::uint64_t max_count,
             bool checkpoints = false);

  std::uint64_t count() const { return k_; }
  unsigned parameter() const { return l_; }
  // A cursor on the first index; one on the first index >= value (from the last
  // checkpoint below it, or from the start without checkpoints).
  RiceCursor begin() const;
  RiceCursor seek(std::uint64_t value) const;
  // All indices into out (count() of them).
  void decode(std::uint32_t* out) const;

 private:
  friend class RiceCursor;
  std::uint64_t k_ = 0;
  unsigned l_ = 0;
  const std::uint8_t* lows_ = nullptr;
  const std::uint8_t* unary_ = nullptr;
  std::size_t unary_size_ = 0;
  const std::uint8_t* end_ = nullptr;  // end of the whole stream
  // Groups of eight lows (group g: indices 8g..8g+7) below this one are read with
  // 16-byte loads that stay inside the stream.
  std::uint64_t wide_groups_ = 0;
  std::vector<RiceCheckpoint> checkpoints_;
};

// Walks a checked stream forward, decoding 64 indices at a time ahead of its reader:
// the unary part a word at a time (every one's position written without a branch per
// index), the lows eight at a time (AVX2 where the CPU has it), so that decoding costs
// a few instructions an index. value() is the current index (kEnd past the last),
// position() its rank. No check can fail: the stream was checked whole.
class RiceCursor {
 public:
  static constexpr std::uint64_t kEnd = std::numeric_limits<std::uint64_t>::max();
  static constexpr unsigned kAhead = 64;

  // at.i must be a multiple of 8 (checkpoints are).
  RiceCursor(const RiceStream& s, const RiceCheckpoint& at);

  std::uint64_t value() const { return pos_ < len_ ? std::uint64_t{ahead_[pos_]} : kEnd; }
  std::uint64_t position() const { return first_ + pos_; }

  // Asks the cache for the stream bytes the next `entries` indices past the decoded ones
  // are read from (their unary and low bits, by the stream's average density): a caller
  // that comes back to this cursor after walking many others has them arrive meanwhile.
  void prefetch(std::uint64_t entries) const;

  // For every run of decoded indices below hi, from the current one: fn(position of the
  // run's first, its indices, how many), so that the caller's loop over a run holds its
  // state in registers (no call, no reload of the cursor per index); stops at the first
  // index >= hi (or the end), which becomes the current one.
  template <typename Fn>
  inline void runs_below(std::uint64_t hi, Fn&& fn) {
    for (;;) {
      const unsigned p = pos_, len = len_;
      unsigned end = len;
      if (p < len && ahead_[len - 1] >= hi)
        end = static_cast<unsigned>(std::lower_bound(ahead_ + p, ahead_ + len, hi) - ahead_);
      if (end > p) fn(first_ + p, static_cast<const std::uint32_t*>(ahead_ + p), end - p);
      pos_ = end;
      if (end < len || next_ >= k_) return;
      refill();
    }
  }

  // runs_below one index at a time, fn(position, index), also calling touch(index) for the
  // index `lead` entries ahead of the one fn is given (within the decoded block; a fresh
  // block's first `lead` as it is decoded): a caller that writes at random addresses
  // fetches them early, so the misses overlap.
  template <typename Fn, typename Touch>
  inline void run_below_touching(std::uint64_t hi, unsigned lead, Fn&& fn, Touch&& touch) {
    for (;;) {
      unsigned p = pos_;
      const unsigned len = len_;
      for (; p < len && ahead_[p] < hi; ++p) {
        if (p + lead < len) touch(std::uint64_t{ahead_[p + lead]});
        fn(first_ + p, std::uint64_t{ahead_[p]});
      }
      pos_ = p;
      if (p < len || next_ >= k_) return;
      refill();
      for (unsigned q = 0; q < lead && q < len_; ++q) touch(std::uint64_t{ahead_[q]});
    }
  }

 private:
  void refill();  // decodes the next (up to) kAhead indices into ahead_

  const RiceStream* s_;
  std::uint64_t k_;
  bool wide_;                // the AVX2 path decodes this stream's lows
  std::uint64_t next_;       // the first index not yet decoded
  std::uint64_t low_sum_;    // the sum of the lows of the indices before next_
  std::size_t word_;         // byte offset in the unary part of the 8-byte word cur_ holds
  std::uint64_t cur_ = 0;    // that word, the ones already decoded cleared
  std::uint64_t first_ = 0;  // the rank of ahead_[0]
  unsigned pos_ = 0, len_ = 0;
  std::uint32_t ahead_[kAhead];
};

}  // namespace fedpress
