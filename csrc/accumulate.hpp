// Sparse accumulation: acc[indices[j]] += weight * values[j], for one client or
// many at once. Callers validate indices against the accumulator first.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "ricestream.hpp"

namespace fedpress {

struct SparseUpdate {
  const std::uint32_t* indices;  // all < acc size; non-decreasing for the blocked path
  const float* values;
  std::size_t count;
  float weight;
};

struct UpdateCheck {
  std::uint32_t max_index = 0;  // 0 for an empty update
  bool sorted = true;           // indices non-decreasing
};

// max index and sortedness of every update, one pass each, clients in parallel.
std::vector<UpdateCheck> check_updates(const std::vector<SparseUpdate>& updates);

// Like scatter_add_many, but accepts unsorted updates: those are stably sorted
// by index on a copy first, so each element still receives its additions in
// client order (and, within a client, in the given order).
void scatter_add_many_any(float* acc, std::size_t n, std::vector<SparseUpdate> updates,
                          const std::vector<UpdateCheck>& checks);

// For each i, accs[i][j] += the entries of updates[i] (sorted or not, as in
// scatter_add_many_any), every accumulator of sizes[i] elements its own: runs of each
// one's ranges are spread over the threads together (a model's tensors in one call).
void scatter_add_each(const std::vector<float*>& accs, const std::vector<std::size_t>& sizes,
                      std::vector<SparseUpdate> updates, const std::vector<UpdateCheck>& checks);

// Many updates, all with non-decreasing indices. The accumulator is cut into
// fixed ranges that stay in cache while every client's entries for that range
// are added, client by client in list order, so each element receives its
// additions in the same order whatever the thread count.
void scatter_add_many(float* acc, std::size_t n, const std::vector<SparseUpdate>& updates);

// One client's kept entries straight from its payload: a checked version 2 index
// stream and its count values, read where they lie (a payload's section, at any
// address): float32 (little-endian), or with bits != 0 quantized codes (bits 1, 2, 4 or
// 8, packed LSB-first) of one scale per bucket, each added as the value dequantize
// gives it, bit for bit, with no decoded copy.
struct StreamUpdate {
  const RiceStream* indices;  // checked with checkpoints, so threads can start anywhere
  const std::uint8_t* values;
  float weight;
  int bits = 0;
  const float* scales = nullptr;
  std::size_t bucket = 0;
};

// scatter_add_many with the index streams decoded as they are added, never
// materialized: the same cache-blocked order (each element receives its additions in
// client order), each thread starting every stream at its first range from the
// stream's nearest checkpoint.
void scatter_add_streams(float* acc, std::size_t n, const std::vector<StreamUpdate>& updates);

// One accumulator of n elements and the streams added into it (in list order).
struct StreamSum {
  float* acc;
  std::size_t n;
  std::vector<StreamUpdate> updates;
  // With divide_after, every element is then divided by divisor (as divide() does it,
  // the same bits), each range right after its last addition, while it is in cache: a
  // mean in the same pass as its sum.
  bool divide_after = false;
  float divisor = 1.0f;
};

// scatter_add_streams for each sum, every accumulator its own: runs of each one's ranges
// are spread over the threads together (a model's tensors in one call).
void scatter_add_streams_each(const std::vector<StreamSum>& sums);

// acc[i] /= divisor for every i, in parallel: a sum's mean, each element exactly as
// float32 division gives it (numpy's in-place division, on one thread).
void divide(float* acc, std::size_t n, float divisor);

}  // namespace fedpress
