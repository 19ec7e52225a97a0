// Magnitude selection: exact top-k, sampled-threshold top-k, random-k, and the
// fused error-feedback top-k. All results list indices strictly ascending.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace fedpress {

struct SparseVector {
  std::vector<std::uint32_t> indices;  // strictly ascending
  std::vector<float> values;           // x[indices]
};

// The k entries of largest |x|; among equal magnitudes the lower index wins.
// 0 <= k <= n. Throws std::invalid_argument if x holds a NaN.
SparseVector topk_exact(const float* x, std::size_t n, std::size_t k);

// Deep-Gradient-Compression style selection: a threshold estimated from a
// seeded sample, one pass to keep everything above it, and an exact fix-up only
// when the count lands outside [0.9, 1.1] * target. Returns between
// ceil(0.9 * target) and floor(1.1 * target) entries (exactly target when that
// band is empty), target = round(ratio * n).
SparseVector topk_threshold(const float* x, std::size_t n, double ratio, std::uint64_t seed);

// The same selections over several arrays taken back to back, as if concatenated
// (indices count from the first array's start; the total must be below 2^32),
// without concatenating them: a model's tensors selected together.
SparseVector topk_exact_many(const std::vector<const float*>& xs, const std::vector<std::size_t>& ns, std::size_t k);
SparseVector topk_threshold_many(const std::vector<const float*>& xs, const std::vector<std::size_t>& ns, double ratio,
                                 std::uint64_t seed);

// A selection over arrays taken back to back (ns their lengths) made local to each:
// every index becomes its offset in its own array, in place, and the returned
// ns.size() + 1 cuts say where each array's entries start and end (array i holds
// entries [cuts[i], cuts[i + 1])). One pass over the indices, which ascend.
std::vector<std::size_t> split_by_array(std::vector<std::uint32_t>& indices, const std::vector<std::size_t>& ns);

// k indices drawn uniformly without replacement, a pure function of (n, k, seed).
std::vector<std::uint32_t> randomk_indices(std::size_t n, std::size_t k, std::uint64_t seed);
SparseVector randomk(const float* x, std::size_t n, std::size_t k, std::uint64_t seed);

// Error-feedback top-k, fused: residual += update; select the exact top-k of the
// residual; zero the selected entries of the residual; return them. The update
// is read once and the residual is read and written once on the common path.
// When it throws (a NaN in the sum), the residual holds residual + update in
// full, so a caller can take the update back out.
// zero_selected = false leaves the selected entries in the residual (equal to the
// values returned), for a caller that overwrites them anyway.
SparseVector ef_topk(const float* update, float* residual, std::size_t n, std::size_t k, bool zero_selected = true);
SparseVector ef_topk_many(const std::vector<const float*>& updates, const std::vector<float*>& residuals,
                          const std::vector<std::size_t>& ns, std::size_t k, bool zero_selected = true);

}  // namespace fedpress
