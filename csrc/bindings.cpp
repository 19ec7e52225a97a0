// The Python face of the kernels: argument checks under the GIL, then raw
// pointers and the GIL released around the kernel, results handed back as
// numpy arrays that own their std::vector without a copy.
//
// Exceptions: MalformedData (malformed bytes) -> DecodeError, a ValueError
// registered here; std::invalid_argument -> ValueError, std::out_of_range ->
// IndexError, std::overflow_error -> OverflowError (pybind11's mapping); type
// mismatches raise TypeError here.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_set>
#include <vector>

#include "accumulate.hpp"
#include "assemble.hpp"
#include "checksum.hpp"
#include "convert.hpp"
#include "eden.hpp"
#include "indexcode.hpp"
#include "intcode.hpp"
#include "pages.hpp"
#include "parallel.hpp"
#include "quantize.hpp"
#include "ricestream.hpp"
#include "rotate.hpp"
#include "simd.hpp"
#include "table.hpp"
#include "topk.hpp"

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

// Vectors are indexed by uint32.
constexpr std::uint64_t kMaxLength = std::numeric_limits<std::uint32_t>::max();

template <typename T>
constexpr const char* dtype_name() {
  if constexpr (std::is_same_v<T, float>) {
    return "float32";
  } else if constexpr (std::is_same_v<T, std::uint32_t>) {
    return "uint32";
  } else if constexpr (std::is_same_v<T, std::uint8_t>) {
    return "uint8";
  } else if constexpr (std::is_same_v<T, std::uint16_t>) {
    return "uint16";
  } else {
    static_assert(std::is_same_v<T, std::uint64_t>, "an array element type the bindings name");
    return "uint64";
  }
}

// How a kernel reaches an array's elements.
enum class Access {
  read,              // through const T*
  write,             // through T*, in place
  read_any_address,  // with memcpy, at any address (the kernel's header says so)
};

// A 1-D C-contiguous array of exactly dtype T, or a clear TypeError/ValueError.
template <typename T>
py::array checked(const py::handle& obj, const char* name, Access access = Access::read) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(name) + " must be a numpy array, got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (!arr.dtype().is(py::dtype::of<T>()) && !arr.dtype().equal(py::dtype::of<T>()))
    throw py::type_error(std::string(name) + " must have dtype " + dtype_name<T>() + ", got " +
                         std::string(py::str(arr.dtype())));
  if (arr.ndim() != 1)
    throw py::value_error(std::string(name) + " must be 1-D, got " + std::to_string(arr.ndim()) + " dimensions");
  if (!(arr.flags() & py::array::c_style)) throw py::value_error(std::string(name) + " must be C-contiguous");
  if (access == Access::write && !arr.writeable()) throw py::value_error(std::string(name) + " must be writable");
  if (static_cast<std::uint64_t>(arr.shape(0)) > kMaxLength)
    throw py::value_error(std::string(name) + " has " + std::to_string(arr.shape(0)) +
                          " elements; at most 2^32 - 1 are supported");
  // numpy makes arrays at any address (np.frombuffer at an odd offset), and a
  // load through a T* that is not a multiple of alignof(T) is undefined
  // behaviour: such an input is copied to fresh memory, such an output refused.
  if (access != Access::read_any_address && reinterpret_cast<std::uintptr_t>(arr.data()) % alignof(T) != 0) {
    if (access == Access::write)
      throw py::value_error(std::string(name) + " is updated in place and must be " + std::to_string(alignof(T)) +
                            "-byte aligned, not a view of a buffer at an offset that is not a multiple of " +
                            std::to_string(alignof(T)));
    py::array_t<T> copy(arr.shape(0));
    std::memcpy(copy.mutable_data(), arr.data(), static_cast<std::size_t>(arr.shape(0)) * sizeof(T));
    return std::move(copy);
  }
  return arr;
}

template <typename T>
const T* cptr(const py::array& a) {
  return static_cast<const T*>(a.data());
}
template <typename T>
T* mptr(py::array& a) {
  return static_cast<T*>(a.mutable_data());
}
std::size_t len(const py::array& a) { return static_cast<std::size_t>(a.shape(0)); }

template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& v) {
  auto* heap = new std::vector<T>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  const py::ssize_t n = static_cast<py::ssize_t>(heap->size());
  static T empty_slot{};
  T* data = heap->empty() ? &empty_slot : heap->data();
  return py::array_t<T>({n}, {static_cast<py::ssize_t>(sizeof(T))}, data, owner);
}

py::tuple sparse_to_tuple(fedpress::SparseVector&& s) {
  return py::make_tuple(to_numpy(std::move(s.indices)), to_numpy(std::move(s.values)));
}

// A selection over arrays taken back to back as (indices local to their array, values,
// cuts): array i's entries are [cuts[i], cuts[i + 1]) (split_by_array).
py::tuple split_to_tuple(fedpress::SparseVector&& s, const std::vector<std::size_t>& ns) {
  std::vector<std::size_t> cuts = fedpress::split_by_array(s.indices, ns);
  return py::make_tuple(to_numpy(std::move(s.indices)), to_numpy(std::move(s.values)), py::cast(cuts));
}

// The memory a kernel that runs tasks in parallel reads and writes: every written span
// must overlap no other span, read or written (a task would read what another writes, or
// two would write the same bytes, and the result would depend on the threads' timing).
class Spans {
 public:
  void add(const void* data, std::size_t bytes, bool written) {
    const auto begin = reinterpret_cast<std::uintptr_t>(data);
    if (bytes) spans_.push_back({begin, begin + bytes, written});
  }
  void add(const py::array& a, bool written) { add(a.data(), static_cast<std::size_t>(a.nbytes()), written); }

  // ValueError(message) when a written span overlaps another span.
  void check(const std::string& message) {
    std::sort(spans_.begin(), spans_.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
    std::uintptr_t any_end = 0, written_end = 0;
    for (const Span& span : spans_) {
      if (span.begin < written_end || (span.written && span.begin < any_end)) throw py::value_error(message);
      any_end = std::max(any_end, span.end);
      if (span.written) written_end = std::max(written_end, span.end);
    }
  }

 private:
  struct Span {
    std::uintptr_t begin, end;
    bool written;
  };
  std::vector<Span> spans_;
};

// Float32 arrays checked one by one (each kept alive here while kernels read or write it),
// for the kernels that take several arrays back to back.
struct FloatArrays {
  std::vector<py::array> arrays;
  std::vector<const float*> ptrs;
  std::vector<std::size_t> sizes;
  std::size_t total = 0;

  FloatArrays(const py::sequence& seq, const char* name, Access access = Access::read) {
    const std::size_t count = py::len(seq);
    arrays.reserve(count);
    for (std::size_t i = 0; i < count; ++i) {
      const std::string what = std::string(name) + "[" + std::to_string(i) + "]";
      arrays.push_back(checked<float>(seq[i], what.c_str(), access));
      ptrs.push_back(cptr<float>(arrays.back()));
      sizes.push_back(len(arrays.back()));
      total += sizes.back();
    }
    if (total > kMaxLength)
      throw py::value_error(std::string(name) + " hold " + std::to_string(total) +
                            " elements together; at most 2^32 - 1 are supported");
  }
};

std::size_t checked_count(long long k, std::size_t n, const char* name) {
  if (k < 0) throw py::value_error(std::string(name) + " must be >= 0, got " + std::to_string(k));
  if (static_cast<unsigned long long>(k) > n)
    throw py::value_error(std::string(name) + " = " + std::to_string(k) + " exceeds the length " + std::to_string(n));
  return static_cast<std::size_t>(k);
}

void register_topk(py::module_& m) {
  m.def(
      "topk",
      [](const py::handle& x_obj, long long k_arg) {
        py::array x = checked<float>(x_obj, "x");
        const std::size_t n = len(x), k = checked_count(k_arg, n, "k");
        fedpress::SparseVector s;
        {
          // Safe without the GIL: only raw buffers kept alive by x are touched.
          py::gil_scoped_release release;
          s = fedpress::topk_exact(cptr<float>(x), n, k);
        }
        return sparse_to_tuple(std::move(s));
      },
      "x"_a, "k"_a, "Exact magnitude top-k of float32 x: (indices uint32 ascending, values float32).");
  m.def(
      "threshold_topk",
      [](const py::handle& x_obj, double ratio, std::uint64_t seed) {
        py::array x = checked<float>(x_obj, "x");
        if (!(ratio >= 0.0 && ratio <= 1.0))
          throw py::value_error("ratio must be in [0, 1], got " + std::to_string(ratio));
        fedpress::SparseVector s;
        {
          py::gil_scoped_release release;
          s = fedpress::topk_threshold(cptr<float>(x), len(x), ratio, seed);
        }
        return sparse_to_tuple(std::move(s));
      },
      "x"_a, "ratio"_a, "seed"_a, "Sampled-threshold selection of about ratio*len(x) largest magnitudes.");
  m.def(
      "topk_many",
      [](const py::sequence& xs_obj, long long k_arg) {
        const FloatArrays xs(xs_obj, "arrays");
        const std::size_t k = checked_count(k_arg, xs.total, "k");
        fedpress::SparseVector s;
        {
          py::gil_scoped_release release;
          s = fedpress::topk_exact_many(xs.ptrs, xs.sizes, k);
        }
        return split_to_tuple(std::move(s), xs.sizes);
      },
      "arrays"_a, "k"_a,
      "topk over float32 arrays taken back to back, without concatenating them: (indices local to "
      "their array, uint32, ascending within it; values float32; cuts: array i's entries are "
      "[cuts[i], cuts[i + 1])).");
  m.def(
      "threshold_topk_many",
      [](const py::sequence& xs_obj, double ratio, std::uint64_t seed) {
        const FloatArrays xs(xs_obj, "arrays");
        if (!(ratio >= 0.0 && ratio <= 1.0))
          throw py::value_error("ratio must be in [0, 1], got " + std::to_string(ratio));
        fedpress::SparseVector s;
        {
          py::gil_scoped_release release;
          s = fedpress::topk_threshold_many(xs.ptrs, xs.sizes, ratio, seed);
        }
        return split_to_tuple(std::move(s), xs.sizes);
      },
      "arrays"_a, "ratio"_a, "seed"_a,
      "threshold_topk over float32 arrays taken back to back: (local indices, values, cuts) as topk_many.");
  m.def(
      "randomk",
      [](const py::handle& x_obj, long long k_arg, std::uint64_t seed) {
        py::array x = checked<float>(x_obj, "x");
        const std::size_t n = len(x), k = checked_count(k_arg, n, "k");
        fedpress::SparseVector s;
        {
          py::gil_scoped_release release;
          s = fedpress::randomk(cptr<float>(x), n, k, seed);
        }
        return sparse_to_tuple(std::move(s));
      },
      "x"_a, "k"_a, "seed"_a, "k entries chosen uniformly without replacement, seeded.");
  m.def(
      "randomk_indices",
      [](std::uint64_t n, long long k_arg, std::uint64_t seed) {
        if (n > kMaxLength) throw py::value_error("n must be < 2^32");
        const std::size_t k = checked_count(k_arg, static_cast<std::size_t>(n), "k");
        std::vector<std::uint32_t> idx;
        {
          py::gil_scoped_release release;
          idx = fedpress::randomk_indices(static_cast<std::size_t>(n), k, seed);
        }
        return to_numpy(std::move(idx));
      },
      "n"_a, "k"_a, "seed"_a, "The ascending indices randomk(x, k, seed) selects for len(x) == n.");
  m.def(
      "ef_topk",
      [](const py::handle& u_obj, const py::handle& r_obj, long long k_arg, bool zero_selected) {
        py::array u = checked<float>(u_obj, "update");
        py::array r = checked<float>(r_obj, "residual", Access::write);
        if (len(u) != len(r))
          throw py::value_error("update and residual lengths differ: " + std::to_string(len(u)) + " vs " +
                                std::to_string(len(r)));
        if (py::module_::import("numpy").attr("shares_memory")(u, r).cast<bool>())
          throw py::value_error("update and residual must not share memory");
        const std::size_t n = len(u), k = checked_count(k_arg, n, "k");
        fedpress::SparseVector s;
        {
          py::gil_scoped_release release;
          s = fedpress::ef_topk(cptr<float>(u), mptr<float>(r), n, k, zero_selected);
        }
        return sparse_to_tuple(std::move(s));
      },
      "update"_a, "residual"_a, "k"_a, "zero_selected"_a = true,
      "residual += update; take the exact top-k of residual; zero them in residual (unless "
      "zero_selected is false); return them.");
  m.def(
      "ef_topk_many",
      [](const py::sequence& u_obj, const py::sequence& r_obj, long long k_arg, bool zero_selected) {
        const FloatArrays u(u_obj, "updates");
        const FloatArrays r(r_obj, "residuals", Access::write);
        if (u.sizes != r.sizes)
          throw py::value_error("updates and residuals must pair up: as many, each of its residual's length");
        // A residual is written while every array is read: no residual may overlap another array.
        Spans spans;
        for (const py::array& a : u.arrays) spans.add(a, false);
        for (const py::array& a : r.arrays) spans.add(a, true);
        spans.check("update and residual arrays must not share memory with a residual");
        const std::size_t k = checked_count(k_arg, u.total, "k");
        std::vector<float*> residuals(r.ptrs.size());
        for (std::size_t i = 0; i < residuals.size(); ++i) residuals[i] = const_cast<float*>(r.ptrs[i]);
        fedpress::SparseVector s;
        {
          py::gil_scoped_release release;
          s = fedpress::ef_topk_many(u.ptrs, residuals, u.sizes, k, zero_selected);
        }
        return split_to_tuple(std::move(s), u.sizes);
      },
      "updates"_a, "residuals"_a, "k"_a, "zero_selected"_a = true,
      "ef_topk over pairs of float32 arrays taken back to back: (local indices, values, cuts) as topk_many.");
}

// Where a decoding kernel writes: a new float32[n], or the caller's acc (writable, n long).
py::array output_or_acc(const py::handle& acc_obj, std::size_t n) {
  if (acc_obj.is_none()) return py::array_t<float>(static_cast<py::ssize_t>(n));
  py::array acc = checked<float>(acc_obj, "acc", Access::write);
  if (len(acc) != n)
    throw py::value_error("acc has " + std::to_string(len(acc)) + " elements, expected n = " + std::to_string(n));
  return acc;
}

// A job tuple's field as T: TypeError naming it otherwise (not pybind11's RuntimeError).
template <typename T>
T field(const py::handle& value, const std::string& name) {
  const bool is_bool = py::isinstance<py::bool_>(value), is_int = py::isinstance<py::int_>(value) && !is_bool;
  const char* wanted = std::is_same<T, bool>::value       ? "a bool"
                       : std::is_floating_point<T>::value ? "a number"
                                                          : "an integer";
  const bool ok = std::is_same<T, bool>::value       ? is_bool
                  : std::is_floating_point<T>::value ? is_int || py::isinstance<py::float_>(value)
                                                     : is_int;
  if (!ok)
    throw py::type_error(name + " must be " + wanted + ", got " +
                         std::string(py::str(py::type::of(value).attr("__name__"))));
  try {
    return value.cast<T>();
  } catch (const py::cast_error&) {
    throw py::value_error(name + " is out of range: " + std::string(py::str(value)));
  }
}

// A dequantize call's arguments, checked, and the job they make (the arrays kept alive here).
struct CheckedDequantize {
  py::array packed, scales, out;
  fedpress::DequantizeJob job{};

  CheckedDequantize(const py::handle& p_obj, const py::handle& s_obj, int bits, long long n_arg, long long bucket,
                    const py::handle& acc_obj, double weight, bool accumulate)
      : packed(checked<std::uint8_t>(p_obj, "packed")), scales(checked<float>(s_obj, "scales")) {
    if (!fedpress::valid_bits(bits)) throw py::value_error("bits must be 1, 2, 4 or 8, got " + std::to_string(bits));
    if (bucket <= 0) throw py::value_error("bucket must be positive, got " + std::to_string(bucket));
    if (n_arg < 0 || static_cast<std::uint64_t>(n_arg) > kMaxLength)
      throw py::value_error("n must be in [0, 2^32 - 1], got " + std::to_string(n_arg));
    const std::size_t n = static_cast<std::size_t>(n_arg), b = static_cast<std::size_t>(bucket);
    if (len(packed) != fedpress::packed_size(n, bits))
      throw py::value_error("packed has " + std::to_string(len(packed)) + " bytes, expected " +
                            std::to_string(fedpress::packed_size(n, bits)) + " for n = " + std::to_string(n) + " at " +
                            std::to_string(bits) + " bits");
    if (len(scales) != fedpress::bucket_count(n, b))
      throw py::value_error("scales has " + std::to_string(len(scales)) + " entries, expected " +
                            std::to_string(fedpress::bucket_count(n, b)) + " for n = " + std::to_string(n) +
                            " and bucket = " + std::to_string(b));
    out = output_or_acc(acc_obj, n);
    job = {cptr<std::uint8_t>(packed),
           cptr<float>(scales),
           bits,
           n,
           b,
           static_cast<float*>(out.mutable_data()),
           accumulate && !acc_obj.is_none(),
           static_cast<float>(weight)};
  }
};

// The jobs of dequantize_many and check_quantized_many, each read and its shapes checked.
std::vector<CheckedDequantize> dequantize_jobs(const py::sequence& jobs_in) {
  std::vector<CheckedDequantize> jobs;
  jobs.reserve(py::len(jobs_in));
  for (const py::handle& item : jobs_in) {
    const std::string where = "jobs[" + std::to_string(jobs.size()) + "]";
    if (!py::isinstance<py::tuple>(item) || py::len(item) != 8)
      throw py::value_error(where + ": a job is a tuple (packed, scales, bits, n, bucket, acc, weight, accumulate)");
    const py::tuple t = py::reinterpret_borrow<py::tuple>(item);
    jobs.emplace_back(t[0], t[1], field<int>(t[2], where + ".bits"), field<long long>(t[3], where + ".n"),
                      field<long long>(t[4], where + ".bucket"), t[5], field<double>(t[6], where + ".weight"),
                      field<bool>(t[7], where + ".accumulate"));
  }
  return jobs;
}

// What the decoder's quantized_parts checks of a section, before anything is written:
// scales finite and >= 0, and no padding bit set in the last byte.
bool scale_is_sound(float scale) { return scale >= 0.0f && std::isfinite(scale); }

// Whether the unused high bits of the last byte of n codes of `bits` bits are zero.
bool padding_is_clear(const std::uint8_t* packed, std::size_t n, int bits) {
  const std::size_t bytes = fedpress::packed_size(n, bits);
  const unsigned used = static_cast<unsigned>((n * static_cast<std::size_t>(bits)) % 8);
  return used == 0 || bytes == 0 || (packed[bytes - 1] >> used) == 0;
}

bool section_is_sound(const CheckedDequantize& d) {
  const std::size_t scales = len(d.scales);
  for (std::size_t b = 0; b < scales; ++b)
    if (!scale_is_sound(d.job.scales[b])) return false;
  return padding_is_clear(d.job.packed, d.job.n, d.job.bits);
}

void register_quantize(py::module_& m) {
  m.def(
      "quantize",
      [](const py::handle& x_obj, int bits, long long bucket, bool stochastic, std::uint64_t seed) {
        py::array x = checked<float>(x_obj, "x");
        if (!fedpress::valid_bits(bits))
          throw py::value_error("bits must be 1, 2, 4 or 8, got " + std::to_string(bits));
        if (bucket <= 0) throw py::value_error("bucket must be positive, got " + std::to_string(bucket));
        const std::size_t n = len(x), b = static_cast<std::size_t>(bucket);
        py::array_t<std::uint8_t> packed(static_cast<py::ssize_t>(fedpress::packed_size(n, bits)));
        py::array_t<float> scales(static_cast<py::ssize_t>(fedpress::bucket_count(n, b)));
        {
          std::uint8_t* p = packed.mutable_data();
          float* s = scales.mutable_data();
          py::gil_scoped_release release;
          fedpress::quantize(cptr<float>(x), n, bits, b, stochastic, seed, p, s);
        }
        return py::make_tuple(packed, scales);
      },
      "x"_a, "bits"_a, "bucket"_a, "stochastic"_a, "seed"_a,
      "Bucketed max-abs quantization: (packed uint8[ceil(n*bits/8)], scales float32[ceil(n/bucket)]).");
  m.def(
      "dequantize",
      [](const py::handle& p_obj, const py::handle& s_obj, int bits, long long n_arg, long long bucket,
         const py::handle& acc_obj, double weight, bool accumulate) {
        CheckedDequantize d(p_obj, s_obj, bits, n_arg, bucket, acc_obj, weight, accumulate);
        {
          py::gil_scoped_release release;
          fedpress::dequantize_many({d.job});
        }
        return d.out;
      },
      "packed"_a, "scales"_a, "bits"_a, "n"_a, "bucket"_a, "acc"_a = py::none(), "weight"_a = 1.0,
      "accumulate"_a = true,
      "weight * the inverse of quantize, float32[n]: a new array, or acc (acc += that, or acc = that "
      "with accumulate=False), returned.");
  m.def(
      "dequantize_many",
      [](const py::sequence& jobs_in, bool check) -> py::object {
        const std::vector<CheckedDequantize> checked_jobs = dequantize_jobs(jobs_in);
        std::vector<fedpress::DequantizeJob> jobs;
        Spans spans;  // the jobs' chunks run together: no output may overlap any job's memory
        for (const CheckedDequantize& d : checked_jobs) {
          jobs.push_back(d.job);
          spans.add(d.packed, false);
          spans.add(d.scales, false);
          spans.add(d.job.out, 4 * d.job.n, true);
        }
        spans.check("a job's output shares memory with another job's output or input, or with its own input");
        if (check)
          for (std::size_t j = 0; j < jobs.size(); ++j)
            if (!section_is_sound(checked_jobs[j])) return py::int_(j);
        {
          py::gil_scoped_release release;
          fedpress::dequantize_many(jobs);
        }
        py::list out;
        for (const CheckedDequantize& d : checked_jobs) out.append(d.out);
        return std::move(out);
      },
      "jobs"_a, "check"_a = false,
      "dequantize for each (packed, scales, bits, n, bucket, acc, weight, accumulate) in one parallel pass "
      "(a payload's tensors, their outputs back to back in two halves, one per thread); the outputs, in order. "
      "With check, first every job's scales must be finite and >= 0 and its last byte's padding bits zero: "
      "the index of the first job that fails is returned instead, and nothing is written.");
  m.def(
      "check_quantized_many",
      [](const py::sequence& jobs_in) -> py::object {
        // Every job is read and its shapes checked first, as dequantize_many does: a malformed
        // job raises whatever comes before it.
        const std::vector<CheckedDequantize> jobs = dequantize_jobs(jobs_in);
        for (std::size_t j = 0; j < jobs.size(); ++j)
          if (!section_is_sound(jobs[j])) return py::int_(j);
        return py::none();
      },
      "jobs"_a,
      "The check of dequantize_many(jobs, check=True) alone, writing nothing: the index of the first job whose "
      "scales are not all finite and >= 0 or whose last byte has a padding bit set, or None.");
  m.def(
      "sign_quantize",
      [](const py::handle& x_obj, long long bucket) {
        py::array x = checked<float>(x_obj, "x");
        if (bucket <= 0) throw py::value_error("bucket must be positive, got " + std::to_string(bucket));
        const std::size_t n = len(x), b = static_cast<std::size_t>(bucket);
        py::array_t<std::uint8_t> packed(static_cast<py::ssize_t>(fedpress::packed_size(n, 1)));
        py::array_t<float> scales(static_cast<py::ssize_t>(fedpress::bucket_count(n, b)));
        {
          std::uint8_t* p = packed.mutable_data();
          float* s = scales.mutable_data();
          py::gil_scoped_release release;
          fedpress::sign_quantize(cptr<float>(x), n, b, p, s);
        }
        return py::make_tuple(packed, scales);
      },
      "x"_a, "bucket"_a,
      "The sign stage: (packed uint8, one bit per value, 1 for x >= 0; scales float32, the mean |x| per "
      "bucket). Dequantized with bits=1.");
}

unsigned stream_version(int version) {
  if (version != 1 && version != 2)
    throw py::value_error("index stream version must be 1 (Golomb) or 2 (split Rice), got " + std::to_string(version));
  return static_cast<unsigned>(version);
}

void register_indexcode(py::module_& m) {
  m.def(
      "encode_indices",
      [](const py::handle& i_obj, std::uint64_t n, int version) {
        py::array idx = checked<std::uint32_t>(i_obj, "indices");
        if (n > kMaxLength + 1) throw py::value_error("n must be <= 2^32");
        const unsigned v = stream_version(version);
        std::vector<std::uint8_t> out;
        {
          py::gil_scoped_release release;
          out = v == 1 ? fedpress::encode_indices(cptr<std::uint32_t>(idx), len(idx), n)
                       : fedpress::encode_rice_stream(cptr<std::uint32_t>(idx), len(idx), n);
        }
        return py::bytes(reinterpret_cast<const char*>(out.data()), static_cast<py::ssize_t>(out.size()));
      },
      "indices"_a, "n"_a, "version"_a = 2,
      "Strictly ascending uint32 indices < n as an index stream: version 2 (split Rice) or 1 (Golomb).");
  m.def(
      "plan_indices_many",
      [](const py::sequence& idx_list, const py::sequence& n_list) {
        if (py::len(idx_list) != py::len(n_list))
          throw py::value_error("indices_list and n_list must have equal lengths, got " +
                                std::to_string(py::len(idx_list)) + " and " + std::to_string(py::len(n_list)));
        std::vector<py::array> keep;
        std::vector<const std::uint32_t*> ptrs;
        std::vector<std::size_t> counts;
        std::vector<std::uint64_t> sizes;
        for (std::size_t i = 0; i < py::len(idx_list); ++i) {
          const std::string label = "indices_list[" + std::to_string(i) + "]";
          keep.push_back(checked<std::uint32_t>(idx_list[i], label.c_str()));
          ptrs.push_back(cptr<std::uint32_t>(keep.back()));
          counts.push_back(len(keep.back()));
          const std::uint64_t n = field<std::uint64_t>(n_list[i], "n_list[" + std::to_string(i) + "]");
          if (n > kMaxLength + 1) throw py::value_error("n_list[" + std::to_string(i) + "] must be <= 2^32");
          sizes.push_back(n);
        }
        std::vector<fedpress::RicePlan> plans;
        {
          py::gil_scoped_release release;
          plans = fedpress::plan_rice_streams(ptrs, counts, sizes);
        }
        py::list out;
        for (const fedpress::RicePlan& p : plans) out.append(py::make_tuple(p.parameter, p.size));
        return out;
      },
      "indices_list"_a, "n_list"_a,
      "The (Rice parameter, size in bytes) of the index stream (version 2) of each array of strictly ascending "
      "uint32 indices < its n, spread over the threads: what assemble's (\"rice\", indices, n, parameter, size) "
      "pieces write. A refusal names its array (\"array i: ...\"), the first in order.");
  m.def(
      "decode_indices",
      [](const py::buffer& buf, std::uint64_t n, std::uint64_t max_count, const py::handle& out_obj,
         int version) -> py::object {
        py::buffer_info info = buf.request();
        if (info.ndim != 1 || info.itemsize != 1 || info.strides[0] != 1)
          throw py::type_error("buf must be a contiguous bytes-like object");
        if (n > kMaxLength + 1) throw py::value_error("n must be <= 2^32");
        const unsigned v = stream_version(version);
        const auto* data = static_cast<const std::uint8_t*>(info.ptr);
        const std::size_t size = static_cast<std::size_t>(info.size);
        if (!out_obj.is_none()) {
          py::array out = checked<std::uint32_t>(out_obj, "out", Access::write);
          auto* o = static_cast<std::uint32_t*>(out.mutable_data());
          const std::size_t count = len(out);
          py::gil_scoped_release release;
          if (v == 1) {
            fedpress::decode_indices_into(data, size, n, o, count);
          } else {
            const fedpress::RiceStream stream(data, size, n, count);
            if (stream.count() != count)
              throw fedpress::MalformedData("index stream holds " + std::to_string(stream.count()) +
                                            " indices, expected " + std::to_string(count));
            stream.decode(o);
          }
          return std::move(out);
        }
        std::vector<std::uint32_t> decoded;
        {
          py::gil_scoped_release release;
          if (v == 1) {
            decoded = fedpress::decode_indices(data, size, n, max_count);
          } else {
            const fedpress::RiceStream stream(data, size, n, max_count);
            decoded.resize(static_cast<std::size_t>(stream.count()));
            stream.decode(decoded.data());
          }
        }
        return to_numpy(std::move(decoded));
      },
      "buf"_a, "n"_a, "max_count"_a, "out"_a = py::none(), "version"_a = 2,
      "Decodes encode_indices output; raises DecodeError on any corruption. With out (uint32, writable), "
      "decodes into it, the stream's count being exactly len(out), and returns it.");
}

// Type and length checks of one client's (indices, values), under the GIL.
fedpress::SparseUpdate typed_update(const py::handle& i_obj, const py::handle& v_obj, double weight,
                                    const std::string& label, std::vector<py::array>& keep) {
  py::array idx = checked<std::uint32_t>(i_obj, ("indices" + label).c_str());
  py::array val = checked<float>(v_obj, ("values" + label).c_str());
  if (len(idx) != len(val))
    throw py::value_error("indices" + label + " and values" + label + " lengths differ: " + std::to_string(len(idx)) +
                          " vs " + std::to_string(len(val)));
  keep.push_back(idx);
  keep.push_back(val);
  return {cptr<std::uint32_t>(idx), cptr<float>(val), len(idx), static_cast<float>(weight)};
}

// Range-checks every update (clients in parallel, GIL released), then adds them;
// an out-of-range index raises IndexError before anything is written.
void add_checked(float* acc, std::size_t n, std::vector<fedpress::SparseUpdate> updates,
                 const std::vector<std::string>& labels) {
  std::vector<fedpress::UpdateCheck> checks;
  {
    py::gil_scoped_release release;  // reads the index buffers only
    checks = fedpress::check_updates(updates);
  }
  for (std::size_t c = 0; c < updates.size(); ++c)
    if (updates[c].count > 0 && checks[c].max_index >= n)
      throw py::index_error("indices" + labels[c] + " holds " + std::to_string(checks[c].max_index) +
                            ", out of range for an accumulator of " + std::to_string(n));
  py::gil_scoped_release release;  // raw buffers kept alive by the caller's arrays
  fedpress::scatter_add_many_any(acc, n, std::move(updates), checks);
}

void register_accumulate(py::module_& m) {
  m.def(
      "scatter_add",
      [](const py::handle& acc_obj, const py::handle& i_obj, const py::handle& v_obj, double weight) {
        py::array acc = checked<float>(acc_obj, "acc", Access::write);
        std::vector<py::array> keep;
        std::vector<fedpress::SparseUpdate> updates{typed_update(i_obj, v_obj, weight, "", keep)};
        add_checked(mptr<float>(acc), len(acc), std::move(updates), {""});
      },
      "acc"_a, "indices"_a, "values"_a, "weight"_a, "acc[indices] += weight * values, in place.");
  m.def(
      "divide",
      [](const py::handle& acc_obj, double divisor) {
        py::array acc = checked<float>(acc_obj, "acc", Access::write);
        float* a = mptr<float>(acc);
        const std::size_t n = len(acc);
        py::gil_scoped_release release;
        fedpress::divide(a, n, static_cast<float>(divisor));
      },
      "acc"_a, "divisor"_a, "acc /= divisor in place, in parallel (float32 division, element by element).");
  m.def(
      "scatter_add_each",
      [](const py::sequence& accs_obj, const py::sequence& idx_list, const py::sequence& val_list, double weight) {
        const std::size_t count = py::len(accs_obj);
        if (py::len(idx_list) != count || py::len(val_list) != count)
          throw py::value_error("accs, indices_list and values_list must have equal lengths, got " +
                                std::to_string(count) + ", " + std::to_string(py::len(idx_list)) + ", " +
                                std::to_string(py::len(val_list)));
        std::vector<py::array> accs, keep;
        std::vector<fedpress::SparseUpdate> updates;
        for (std::size_t i = 0; i < count; ++i) {
          const std::string label = "[" + std::to_string(i) + "]";
          accs.push_back(checked<float>(accs_obj[i], ("accs" + label).c_str(), Access::write));
          updates.push_back(typed_update(idx_list[i], val_list[i], weight, label, keep));
        }
        Spans spans;  // the entries run together: no accumulator may overlap any entry's memory
        for (const py::array& a : keep) spans.add(a, false);
        for (const py::array& a : accs) spans.add(a, true);
        spans.check("an accumulator shares memory with another accumulator, or with indices or values");
        std::vector<fedpress::UpdateCheck> checks;
        {
          py::gil_scoped_release release;
          checks = fedpress::check_updates(updates);
        }
        for (std::size_t i = 0; i < count; ++i)
          if (updates[i].count > 0 && checks[i].max_index >= len(accs[i]))
            throw py::index_error("indices[" + std::to_string(i) + "] holds " + std::to_string(checks[i].max_index) +
                                  ", out of range for an accumulator of " + std::to_string(len(accs[i])));
        std::vector<float*> outs;
        std::vector<std::size_t> sizes;
        for (const py::array& a : accs) {
          outs.push_back(static_cast<float*>(const_cast<void*>(a.data())));
          sizes.push_back(len(a));
        }
        py::gil_scoped_release release;
        fedpress::scatter_add_each(outs, sizes, std::move(updates), checks);
      },
      "accs"_a, "indices_list"_a, "values_list"_a, "weight"_a,
      "For each i: accs[i][indices_list[i]] += weight * values_list[i], in place; the accumulators "
      "(a model's tensors) are spread over the threads.");
  m.def(
      "scatter_add_many",
      [](const py::handle& acc_obj, const py::sequence& idx_list, const py::sequence& val_list,
         const std::vector<double>& weights) {
        py::array acc = checked<float>(acc_obj, "acc", Access::write);
        const std::size_t clients = py::len(idx_list);
        if (py::len(val_list) != clients || weights.size() != clients)
          throw py::value_error("indices_list, values_list and weights must have equal lengths, got " +
                                std::to_string(clients) + ", " + std::to_string(py::len(val_list)) + ", " +
                                std::to_string(weights.size()));
        std::vector<py::array> keep;
        std::vector<fedpress::SparseUpdate> updates;
        std::vector<std::string> labels;
        updates.reserve(clients);
        for (std::size_t c = 0; c < clients; ++c) {
          labels.push_back("[" + std::to_string(c) + "]");
          updates.push_back(typed_update(idx_list[c], val_list[c], weights[c], labels.back(), keep));
        }
        add_checked(mptr<float>(acc), len(acc), std::move(updates), labels);
      },
      "acc"_a, "indices_list"_a, "values_list"_a, "weights"_a,
      "For each client c in order: acc[indices_list[c]] += weights[c] * values_list[c]. Unsorted "
      "indices are sorted (stably) on a copy.");
}

// The jobs of a checksum that decodes on the way (crc32c_decoding, check_payloads), built
// with the GIL held: (offset, code, n, out[, weight]), code fp32/fp16/bf16 (n values into
// out, float32) or fp32-finite (a check, out None); or (offset, code, n, out, scales_offset,
// bucket[, weight]), code q8/q4/q2/q1, a quantized section's n values dequantized into out:
// its packed codes at offset, its bucket scales (float32, little-endian) at scales_offset.
// A weight makes what is written the first term of a sum (an aggregator's first payload,
// written straight into its new sums): a float job writes 0 + weight * value, a quantized one
// weight * value as dequantize_many does (float32; each as the aggregator's other path adds
// them, bit for bit, signed zeros included). Values are checked before they are weighted.
struct DecodingJobs {
  std::vector<py::array> outs;             // kept alive while the jobs write them
  std::vector<std::vector<float>> scales;  // a quantized job's scales, aligned
  std::vector<fedpress::ChecksumJob> jobs;
  // One flag per job, written by whichever piece finds a non-finite value (a quantized
  // job: a negative or non-finite scale, or a padding bit set).
  std::unique_ptr<std::atomic<bool>[]> finite;

  DecodingJobs(const std::uint8_t* data, std::size_t size, const py::sequence& jobs_in)
      : outs(py::len(jobs_in)), scales(outs.size()), jobs(outs.size()), finite(new std::atomic<bool>[outs.size()]) {
    for (std::size_t j = 0; j < jobs.size(); ++j) {
      const py::tuple t = py::reinterpret_borrow<py::tuple>(jobs_in[j]);
      if (t.size() < 4 || t.size() > 7)
        throw py::value_error(
            "a job is (offset, code, n, out[, weight]) or (offset, code, n, out, scales_offset, bucket[, weight])");
      const std::size_t offset = t[0].cast<std::size_t>(), n = t[2].cast<std::size_t>();
      const std::string code = t[1].cast<std::string>();
      finite[j].store(true);
      std::atomic<bool>* flag = &finite[j];
      if (code.size() == 2 && code[0] == 'q') {
        quantized_job(j, data, size, t, offset, code, n);
        continue;
      }
      if (t.size() != 4 && t.size() != 5)
        throw py::value_error("job " + std::to_string(j) + ": a float job is (offset, code, n, out[, weight])");
      const bool weighted = t.size() == 5;
      const float weight = weighted ? job_weight(t[4], j) : 1.0f;
      const bool check_only = code == "fp32-finite";
      if (check_only && weighted) throw py::value_error("job " + std::to_string(j) + ": a check has no weight");
      fedpress::FloatCode c = fedpress::FloatCode::fp32;
      if (code == "fp16")
        c = fedpress::FloatCode::fp16;
      else if (code == "bf16")
        c = fedpress::FloatCode::bf16;
      else if (code != "fp32" && !check_only)
        throw py::value_error("unknown job code " + code);
      const std::size_t width = c == fedpress::FloatCode::fp32 ? 4 : 2;
      if (offset > size || n > (size - offset) / width)
        throw py::value_error("job " + std::to_string(j) + " reaches past the buffer");
      float* out = nullptr;
      if (!check_only) {
        outs[j] = checked<float>(t[3], "out", Access::write);
        if (len(outs[j]) != n) throw py::value_error("job " + std::to_string(j) + ": out must hold n values");
        out = mptr<float>(outs[j]);
      }
      const std::uint8_t* at = data + offset;
      // A tensor larger than the caches is streamed out: nothing reads it back soon (a
      // weighted one is, by its multiplication).
      const bool streaming = n >= fedpress::kStreamingValues && !weighted;
      jobs[j] = {offset, n, width,
                 [=](std::size_t first, std::size_t last) {
                   const bool ok = out == nullptr ? fedpress::floats_finite(at + 4 * first, last - first)
                                                  : fedpress::decode_floats_serial(c, at + width * first, last - first,
                                                                                   out + first, streaming);
                   if (!ok) flag->store(false, std::memory_order_relaxed);
                   if (out != nullptr && weighted)  // numpy's product, then its sum with a zero
                     for (std::size_t i = first; i < last; ++i) out[i] = 0.0f + out[i] * weight;
                 },
                 !check_only};
    }
  }

  // A quantized section's job: its units are 8 values, `bits` bytes of packed codes, so
  // that each starts on a byte; each checks the scales of the buckets it touches (and the
  // last one the padding bits) and dequantizes as dequantize_many would, bit for bit.
  void quantized_job(std::size_t j, const std::uint8_t* data, std::size_t size, const py::tuple& t, std::size_t offset,
                     const std::string& code, std::size_t n) {
    const int bits = code[1] - '0';
    if (!fedpress::valid_bits(bits)) throw py::value_error("unknown job code " + code);
    if (t.size() != 6 && t.size() != 7)
      throw py::value_error("job " + std::to_string(j) +
                            ": a quantized job is (offset, code, n, out, scales_offset, bucket[, weight])");
    const float weight = t.size() == 7 ? job_weight(t[6], j) : 1.0f;
    const long long bucket_in = t[5].cast<long long>();
    if (bucket_in <= 0) throw py::value_error("job " + std::to_string(j) + ": bucket must be positive");
    const std::size_t bucket = static_cast<std::size_t>(bucket_in), scales_at = t[4].cast<std::size_t>();
    const std::size_t bytes = fedpress::packed_size(n, bits), buckets = fedpress::bucket_count(n, bucket);
    if (offset > size || bytes > size - offset || scales_at > size || buckets > (size - scales_at) / 4)
      throw py::value_error("job " + std::to_string(j) + " reaches past the buffer");
    outs[j] = checked<float>(t[3], "out", Access::write);
    if (len(outs[j]) != n) throw py::value_error("job " + std::to_string(j) + ": out must hold n values");
    scales[j].resize(buckets);
    if (buckets) std::memcpy(scales[j].data(), data + scales_at, 4 * buckets);  // little-endian hosts
    const fedpress::DequantizeJob job{data + offset, scales[j].data(),     bits,  n,
                                      bucket,        mptr<float>(outs[j]), false, weight};
    std::atomic<bool>* flag = &finite[j];
    jobs[j] = {offset, fedpress::ceil_div(n, 8), static_cast<std::size_t>(bits),
               [=](std::size_t first, std::size_t last) {
                 const std::size_t begin = 8 * first, end = std::min(n, 8 * last);
                 if (begin >= end) return;
                 bool ok = true;
                 for (std::size_t b = begin / bucket; b <= (end - 1) / bucket; ++b)
                   ok = ok && scale_is_sound(job.scales[b]);
                 if (end == n) ok = ok && padding_is_clear(job.packed, n, bits);
                 fedpress::dequantize_range(job, begin, end);
                 if (!ok) flag->store(false, std::memory_order_relaxed);
               },
               true};
  }

  // A job's weight: a finite float32.
  static float job_weight(const py::handle& value, std::size_t j) {
    if (!py::isinstance<py::float_>(value) && !py::isinstance<py::int_>(value))
      throw py::type_error("job " + std::to_string(j) + ": weight must be a number");
    const double w = value.cast<double>();
    const float w32 = static_cast<float>(w);
    if (!std::isfinite(w) || !std::isfinite(w32))
      throw py::value_error("job " + std::to_string(j) + ": weight must be finite in float32, got " +
                            std::to_string(w));
    return w32;
  }

  py::list flags() const {
    py::list out;
    for (std::size_t j = 0; j < jobs.size(); ++j) out.append(finite[j].load());
    return out;
  }
};

// A contiguous buffer's export (kept for as long as the kernels read it).
py::buffer_info contiguous_bytes(const py::handle& obj, const char* name) {
  py::buffer_info info = py::reinterpret_borrow<py::buffer>(obj).request();
  if (info.ndim > 1 || (info.ndim == 1 && info.strides[0] != info.itemsize))
    throw py::type_error(std::string(name) + " must be a contiguous bytes-like object");
  return info;
}

std::size_t byte_size(const py::buffer_info& info) { return static_cast<std::size_t>(info.size * info.itemsize); }

// A payload built from parts appended in turn (a header, then a compressor's output as it
// comes) into one bytes object of a given capacity, shrunk to what was written when done,
// with the CRC-32C of all of it appended: each part copied once, and no join of them at
// the end. The bytes object is nobody else's until finish() hands it out.
class PayloadBuilder {
 public:
  explicit PayloadBuilder(std::size_t capacity) : capacity_(capacity) {
    if (capacity > static_cast<std::size_t>(std::numeric_limits<Py_ssize_t>::max()) - 4)
      throw py::value_error("capacity is too large");
    raw_ = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(capacity + 4));  // its pages touched as written
    if (raw_ == nullptr) throw py::error_already_set();
  }
  ~PayloadBuilder() { Py_XDECREF(raw_); }
  PayloadBuilder(const PayloadBuilder&) = delete;
  PayloadBuilder& operator=(const PayloadBuilder&) = delete;

  void append(const py::buffer& part) {
    if (raw_ == nullptr) throw py::value_error("the payload was finished already");
    const py::buffer_info info = contiguous_bytes(part, "part");
    const std::size_t n = byte_size(info);
    if (n > capacity_ - size_)
      throw py::value_error("a part of " + std::to_string(n) + " bytes does not fit in the " +
                            std::to_string(capacity_ - size_) + " left");
    std::uint8_t* at = reinterpret_cast<std::uint8_t*>(PyBytes_AS_STRING(raw_)) + size_;
    const auto* from = static_cast<const std::uint8_t*>(info.ptr);
    // With the GIL held (a part is a compressor's window at most): another thread cannot
    // append or finish meanwhile.
    std::memcpy(at, from, n);
    crc_ = fedpress::crc32c(at, n, crc_);  // while it is in cache
    size_ += n;
  }

  py::bytes finish() {
    if (raw_ == nullptr) throw py::value_error("the payload was finished already");
    std::memcpy(PyBytes_AS_STRING(raw_) + size_, &crc_, 4);  // little-endian hosts
    if (_PyBytes_Resize(&raw_, static_cast<Py_ssize_t>(size_ + 4)) != 0) {
      raw_ = nullptr;  // freed by _PyBytes_Resize
      throw py::error_already_set();
    }
    PyObject* out = raw_;
    raw_ = nullptr;
    return py::reinterpret_steal<py::bytes>(out);
  }

 private:
  PyObject* raw_ = nullptr;
  std::size_t capacity_ = 0, size_ = 0;
  std::uint32_t crc_ = 0;
};

void register_checksum(py::module_& m) {
  py::class_<PayloadBuilder>(m, "PayloadBuilder",
                             "Parts appended into one bytes object (each copied once); finish() shrinks it to them "
                             "and appends their CRC-32C (little-endian).")
      .def(py::init<std::size_t>(), "capacity"_a)
      .def("append", &PayloadBuilder::append, "part"_a)
      .def("finish", &PayloadBuilder::finish);
  m.def(
      "discard_pages",
      [](const py::buffer& buf, std::size_t begin, std::size_t end) {
        const py::buffer_info info = contiguous_bytes(buf, "data");
        if (begin > end || end > byte_size(info)) throw py::value_error("[begin, end) must lie inside the buffer");
        fedpress::discard_pages(info.ptr, begin, end);
      },
      "data"_a, "begin"_a, "end"_a,
      "Hands the whole pages of data[begin:end] back to the system (Linux; elsewhere nothing): they read as "
      "zeros after. Only for a buffer of one's own that nobody reads there again.");
  m.def(
      "crc32c",
      [](const py::buffer& buf, std::uint32_t crc) {
        const py::buffer_info info = contiguous_bytes(buf, "data");
        const auto* data = static_cast<const std::uint8_t*>(info.ptr);
        py::gil_scoped_release release;  // reads the buffer only
        return fedpress::crc32c(data, byte_size(info), crc);
      },
      "data"_a, "crc"_a = 0, "CRC-32C of data, continuing from crc.");
  m.def(
      "crc32c_decoding",
      [](const py::buffer& buf, const py::sequence& jobs_in) {
        const py::buffer_info info = contiguous_bytes(buf, "data");
        const auto* data = static_cast<const std::uint8_t*>(info.ptr);
        const DecodingJobs jobs(data, byte_size(info), jobs_in);
        std::uint32_t crc;
        {
          py::gil_scoped_release release;
          crc = fedpress::crc32c_with_jobs(data, byte_size(info), jobs.jobs);
        }
        return py::make_tuple(crc, jobs.flags());
      },
      "data"_a, "jobs"_a,
      "CRC-32C of data, decoding value sections on the way while each piece is in cache: jobs are "
      "(offset, code, n, out[, weight]), code fp32/fp16/bf16 (n values into out, float32) or fp32-finite (a "
      "check, out None), or (offset, code, n, out, scales_offset, bucket[, weight]), code q8/q4/q2/q1 (a "
      "quantized section: packed codes at offset, bucket scales at scales_offset, n values dequantized into "
      "out); with a weight, what is written is the first term of a sum (float: 0 + weight * value; quantized: "
      "weight * value; float32). Returns (crc, [whether each job's values are all finite, before weighting; a "
      "quantized job's: its scales finite and >= 0, no padding bit set]).");
}

// A rotation block size: a power of two in [1, 2^24].
std::size_t rotate_block(long long block) {
  if (block < 1 || !fedpress::valid_rotate_block(static_cast<std::size_t>(block)))
    throw py::value_error("block must be a power of two in [1, 2^24], got " + std::to_string(block));
  return static_cast<std::size_t>(block);
}

void register_rotate(py::module_& m) {
  m.def(
      "rht_padded_size",
      [](std::uint64_t n, long long block_arg) {
        const std::size_t b = rotate_block(block_arg);
        if (n > kMaxLength) throw py::value_error("n must be < 2^32, got " + std::to_string(n));
        return fedpress::rht_padded_size(static_cast<std::size_t>(n), b);
      },
      "n"_a, "block"_a, "Length of rht's output for n elements: full blocks, then the tail padded to a power of two.");
  m.def(
      "rht",
      [](const py::handle& x_obj, std::uint64_t seed, long long block_arg) {
        py::array x = checked<float>(x_obj, "x");
        const std::size_t b = rotate_block(block_arg);
        const std::size_t n = len(x), padded = fedpress::rht_padded_size(n, b);
        if (padded > kMaxLength)
          throw py::value_error("x has " + std::to_string(n) + " elements; padded to " + std::to_string(padded) +
                                " they exceed 2^32 - 1");
        py::array_t<float> out(static_cast<py::ssize_t>(padded));
        {
          float* o = out.mutable_data();
          py::gil_scoped_release release;
          fedpress::rht_forward(cptr<float>(x), n, b, seed, o);
        }
        return out;
      },
      "x"_a, "seed"_a, "block"_a,
      "Seeded randomized Hadamard rotation, blockwise: float32[rht_padded_size(n, block)].");
  m.def(
      "irht",
      [](const py::handle& y_obj, long long n_arg, std::uint64_t seed, long long block_arg) {
        py::array y = checked<float>(y_obj, "y");
        const std::size_t b = rotate_block(block_arg);
        if (n_arg < 0 || static_cast<std::uint64_t>(n_arg) > kMaxLength)
          throw py::value_error("n must be in [0, 2^32 - 1], got " + std::to_string(n_arg));
        const std::size_t n = static_cast<std::size_t>(n_arg), padded = fedpress::rht_padded_size(n, b);
        if (len(y) != padded)
          throw py::value_error("y has " + std::to_string(len(y)) + " elements, expected " + std::to_string(padded) +
                                " = rht_padded_size(" + std::to_string(n) + ", " + std::to_string(b) + ")");
        py::array_t<float> out(static_cast<py::ssize_t>(n));
        {
          float* o = out.mutable_data();
          py::gil_scoped_release release;
          fedpress::rht_inverse(cptr<float>(y), padded, n, b, seed, o);
        }
        return out;
      },
      "y"_a, "n"_a, "seed"_a, "block"_a, "Inverse of rht: float32[n].");
  m.def(
      "fwht",
      [](const py::handle& x_obj, long long block_arg) {
        py::array x = checked<float>(x_obj, "x", Access::write);
        const std::size_t b = rotate_block(block_arg), n = len(x);
        if (fedpress::rht_padded_size(n, b) != n)
          throw py::value_error("x has " + std::to_string(n) + " elements: not whole blocks of " + std::to_string(b) +
                                " and a power-of-two tail (the length of rht's output)");
        float* p = mptr<float>(x);
        py::gil_scoped_release release;  // the buffer is kept alive by x
        fedpress::fwht_inplace(p, n, b);
      },
      "x"_a, "block"_a, "Orthonormal Walsh-Hadamard transform of each block of x, in place.");
  m.def(
      "random_signs",
      [](const py::handle& x_obj, std::uint64_t seed) {
        py::array x = checked<float>(x_obj, "x", Access::write);
        float* p = mptr<float>(x);
        const std::size_t n = len(x);
        py::gil_scoped_release release;  // the buffer is kept alive by x
        fedpress::random_signs_inplace(p, n, seed);
      },
      "x"_a, "seed"_a, "x_i *= s_i in place, with the random signs rht uses for seed.");
}

// ------------------------------------------------------------------- eden --
int eden_bits(int bits) {
  if (!fedpress::valid_eden_bits(bits))
    throw py::value_error("bits must be 1, 2, 3, 4 or 8, got " + std::to_string(bits));
  return bits;
}

std::size_t length_arg(long long n, const char* name) {
  if (n < 0 || static_cast<std::uint64_t>(n) > kMaxLength)
    throw py::value_error(std::string(name) + " must be in [0, 2^32 - 1], got " + std::to_string(n));
  return static_cast<std::size_t>(n);
}

// The rotated length m = rht_padded_size(n, block), checked to fit uint32 indices.
std::size_t eden_rotated_size(std::size_t n, std::size_t block) {
  const std::size_t m = fedpress::rht_padded_size(n, block);
  if (m > kMaxLength)
    throw py::value_error("n = " + std::to_string(n) + " padded to " + std::to_string(m) + " exceeds 2^32 - 1");
  return m;
}

void expect_length(const py::array& a, std::size_t expected, const char* name, const std::string& why) {
  if (len(a) != expected)
    throw py::value_error(std::string(name) + " has " + std::to_string(len(a)) + " elements, expected " +
                          std::to_string(expected) + " " + why);
}

std::string padded_size_text(std::size_t n, std::size_t block) {
  return "= rht_padded_size(" + std::to_string(n) + ", " + std::to_string(block) + ")";
}

fedpress::EdenRounding rounding(bool stochastic) {
  return stochastic ? fedpress::EdenRounding::stochastic : fedpress::EdenRounding::nearest;
}

// A packed code stream and its scales for n values, checked under the GIL.
struct EdenCodes {
  py::array packed, scales;
  std::size_t m;
};

EdenCodes eden_codes(const py::handle& p_obj, const py::handle& s_obj, std::size_t n, int bits, std::size_t block) {
  EdenCodes c{checked<std::uint8_t>(p_obj, "packed"), checked<float>(s_obj, "scales"), eden_rotated_size(n, block)};
  const std::string at = "for n = " + std::to_string(n) + ", block = " + std::to_string(block);
  expect_length(c.packed, fedpress::eden_packed_size(c.m, bits), "packed",
                at + " at " + std::to_string(bits) + " bits");
  expect_length(c.scales, fedpress::eden_num_blocks(n, block), "scales", at);
  fedpress::eden_check_padding(cptr<std::uint8_t>(c.packed), c.m, bits);
  return c;
}

fedpress::EdenScale eden_scale(bool mse) { return mse ? fedpress::EdenScale::mse : fedpress::EdenScale::unbiased; }

// Allocates the outputs of quantizing n values, runs kernel(m, packed, scales,
// outlier_idx, outlier_val) without the GIL and returns the four arrays.
template <typename Kernel>
py::tuple eden_quantized(std::size_t n, std::size_t block, int bits, Kernel&& kernel) {
  const std::size_t m = eden_rotated_size(n, block);
  py::array_t<std::uint8_t> packed(static_cast<py::ssize_t>(fedpress::eden_packed_size(m, bits)));
  py::array_t<float> scales(static_cast<py::ssize_t>(fedpress::eden_num_blocks(n, block)));
  std::vector<std::uint32_t> idx;
  std::vector<float> val;
  {
    std::uint8_t* p = packed.mutable_data();
    float* s = scales.mutable_data();
    py::gil_scoped_release release;  // the kernel touches raw buffers kept alive by the caller's arrays
    kernel(m, p, s, idx, val);
  }
  return py::make_tuple(packed, scales, to_numpy(std::move(idx)), to_numpy(std::move(val)));
}

// A binding of eden_rotate or eden_unrotate: y (float32, writable) in place.
auto in_place_rotation(void (*kernel)(float*, std::size_t, std::size_t, std::uint64_t)) {
  return [kernel](const py::handle& y_obj, long long block_arg, std::uint64_t seed) {
    py::array y = checked<float>(y_obj, "y", Access::write);
    const std::size_t block = rotate_block(block_arg);
    float* p = static_cast<float*>(y.mutable_data());
    const std::size_t n = len(y);
    py::gil_scoped_release release;  // raw buffer only
    kernel(p, n, block, seed);
  };
}

void register_eden(py::module_& m) {
  m.def(
      "eden_centroids",
      [](int bits) { return py::array_t<float>(1 << eden_bits(bits), fedpress::eden_centroids(bits)); }, "bits"_a,
      "The 2^bits Lloyd-Max centroids of N(0, 1), ascending: float32.");
  m.def(
      "eden_levels",
      [](int bits) { return py::array_t<float>(1 << eden_bits(bits), fedpress::eden_stochastic_levels(bits)); },
      "bits"_a, "The 2^bits levels on [-3.3, 3.3] of the stochastic mode, spaced for N(0, 1): float32.");
  m.def("eden_derived_seed", &fedpress::eden_derived_seed, "seed"_a,
        "The quantization seed eden_encode derives from the rotation seed.");
  m.def(
      "eden_quantize",
      [](const py::handle& y_obj, long long n_arg, int bits, std::uint64_t seed, long long block_arg, bool stochastic,
         bool mse) {
        py::array y = checked<float>(y_obj, "y");
        const std::size_t n = length_arg(n_arg, "n"), block = rotate_block(block_arg);
        eden_bits(bits);
        expect_length(y, eden_rotated_size(n, block), "y", padded_size_text(n, block));
        return eden_quantized(n, block, bits, [&](std::size_t m, std::uint8_t* p, float* s, auto& idx, auto& val) {
          fedpress::eden_quantize(cptr<float>(y), m, n, block, bits, rounding(stochastic), eden_scale(mse), seed, p, s,
                                  idx, val);
        });
      },
      "y"_a, "n"_a, "bits"_a, "seed"_a, "block"_a, "stochastic"_a, "mse"_a,
      "EDEN quantization of a rotated vector: (packed uint8, scales float32, outlier_idx uint32, outlier_val "
      "float32).");
  m.def(
      "eden_dequantize",
      [](const py::handle& p_obj, const py::handle& s_obj, long long n_arg, int bits, long long block_arg,
         bool stochastic) {
        const std::size_t n = length_arg(n_arg, "n"), block = rotate_block(block_arg);
        const EdenCodes c = eden_codes(p_obj, s_obj, n, eden_bits(bits), block);
        py::array_t<float> out(static_cast<py::ssize_t>(c.m));
        {
          float* o = out.mutable_data();
          py::gil_scoped_release release;  // raw buffers kept alive by the arrays
          fedpress::eden_dequantize(cptr<std::uint8_t>(c.packed), cptr<float>(c.scales), c.m, n, block, bits,
                                    rounding(stochastic), o);
        }
        return out;
      },
      "packed"_a, "scales"_a, "n"_a, "bits"_a, "block"_a, "stochastic"_a,
      "The rotated vector eden_quantize's codes stand for, outliers not applied: float32[rht_padded_size(n, block)].");
  m.def(
      "eden_accumulate",
      [](const py::handle& acc_obj, const py::handle& p_obj, const py::handle& s_obj, long long n_arg, int bits,
         long long block_arg, bool stochastic, double weight) {
        py::array acc = checked<float>(acc_obj, "acc", Access::write);
        const std::size_t n = length_arg(n_arg, "n"), block = rotate_block(block_arg);
        const EdenCodes c = eden_codes(p_obj, s_obj, n, eden_bits(bits), block);
        expect_length(acc, c.m, "acc", padded_size_text(n, block));
        float* a = mptr<float>(acc);
        py::gil_scoped_release release;  // raw buffers kept alive by the arrays
        fedpress::eden_accumulate(cptr<std::uint8_t>(c.packed), cptr<float>(c.scales), c.m, n, block, bits,
                                  rounding(stochastic), static_cast<float>(weight), a);
      },
      "acc"_a, "packed"_a, "scales"_a, "n"_a, "bits"_a, "block"_a, "stochastic"_a, "weight"_a,
      "acc += float32(weight) * eden_dequantize(...), in place, bit-identical to doing it in two steps.");
  m.def(
      "eden_encode",
      [](const py::handle& x_obj, int bits, std::uint64_t seed, long long block_arg, bool stochastic, bool mse,
         std::uint64_t quant_seed) {
        py::array x = checked<float>(x_obj, "x");
        const std::size_t n = len(x), block = rotate_block(block_arg);
        eden_bits(bits);
        py::array_t<std::uint8_t> packed(static_cast<py::ssize_t>(fedpress::eden_layout_code_bytes(n, block, bits)));
        py::array_t<float> scales(static_cast<py::ssize_t>(fedpress::eden_layout_scales(n, block)));
        std::vector<std::uint32_t> idx;
        std::vector<float> val;
        {
          std::uint8_t* p = packed.mutable_data();
          float* s = scales.mutable_data();
          py::gil_scoped_release release;  // raw buffers kept alive by the arrays
          fedpress::eden_encode(cptr<float>(x), n, block, bits, rounding(stochastic), eden_scale(mse), seed, quant_seed,
                                p, s, idx, val);
        }
        return py::make_tuple(packed, scales, to_numpy(std::move(idx)), to_numpy(std::move(val)));
      },
      "x"_a, "bits"_a, "seed"_a, "block"_a, "stochastic"_a, "mse"_a, "quant_seed"_a,
      "EDEN in the wire layout (segments rotated twice, docs/format.md): "
      "(packed uint8, scales float32, outlier_idx uint32, outlier_val float32).");
  m.def(
      "eden_decode",
      [](const py::handle& p_obj, const py::handle& s_obj, long long n_arg, int bits, std::uint64_t seed,
         long long block_arg, bool stochastic, const py::handle& i_obj, const py::handle& v_obj,
         const py::handle& acc_obj, double weight, bool accumulate) {
        const std::size_t n = length_arg(n_arg, "n"), block = rotate_block(block_arg);
        eden_bits(bits);
        // Sections are views of a payload at any offset: the codes are bytes and
        // the scales are read where they lie.
        py::array packed = checked<std::uint8_t>(p_obj, "packed");
        py::array scales = checked<float>(s_obj, "scales");
        const std::string at = "for n = " + std::to_string(n) + ", block = " + std::to_string(block);
        expect_length(packed, fedpress::eden_layout_code_bytes(n, block, bits), "packed",
                      at + " at " + std::to_string(bits) + " bits");
        expect_length(scales, fedpress::eden_layout_scales(n, block), "scales", at);
        py::array idx = checked<std::uint32_t>(i_obj, "outlier_idx");
        py::array val = checked<float>(v_obj, "outlier_val");
        expect_length(val, len(idx), "outlier_val", "(one per outlier_idx)");
        py::array out = output_or_acc(acc_obj, n);
        {
          float* o = static_cast<float*>(out.mutable_data());
          py::gil_scoped_release release;  // raw buffers kept alive by the arrays
          fedpress::eden_decode(cptr<std::uint8_t>(packed), cptr<float>(scales), n, block, bits, rounding(stochastic),
                                seed, cptr<std::uint32_t>(idx), cptr<float>(val), len(idx), o,
                                accumulate && !acc_obj.is_none(), static_cast<float>(weight));
        }
        return out;
      },
      "packed"_a, "scales"_a, "n"_a, "bits"_a, "seed"_a, "block"_a, "stochastic"_a, "outlier_idx"_a, "outlier_val"_a,
      "acc"_a = py::none(), "weight"_a = 1.0, "accumulate"_a = true,
      "weight * the inverse of eden_encode, float32[n]: a new array, or acc (acc += that, or acc = that "
      "with accumulate=False), returned.");
  m.def(
      "eden_rotation_bound",
      [](const py::handle& s_obj, int bits, bool stochastic, const py::handle& v_obj, long long n_arg,
         long long block_arg) {
        py::array scales = checked<float>(s_obj, "scales");
        py::array val = checked<float>(v_obj, "outlier_val");
        const std::size_t n = length_arg(n_arg, "n"), block = rotate_block(block_arg);
        return fedpress::eden_rotation_bound(cptr<float>(scales), len(scales), eden_bits(bits), rounding(stochastic),
                                             cptr<float>(val), len(val), n, block);
      },
      "scales"_a, "bits"_a, "stochastic"_a, "outlier_val"_a, "n"_a, "block"_a,
      "An upper bound on every value the inverse rotation of an EDEN section computes (csrc/eden.hpp).");
  m.def("eden_unrotate", in_place_rotation(fedpress::eden_unrotate), "y"_a, "block"_a, "seed"_a,
        "Undoes eden_encode's rotation of y, in place.");
  m.def("eden_rotate", in_place_rotation(fedpress::eden_rotate), "y"_a, "block"_a, "seed"_a,
        "eden_encode's rotation of y alone, in place (eden_unrotate undoes it).");
}

int code_width(int width) {
  if (width < 1 || width > fedpress::kMaxWidth)
    throw py::value_error("width must be in [1, " + std::to_string(fedpress::kMaxWidth) + "], got " +
                          std::to_string(width));
  return width;
}

// The width of n codes packed in `info`, which must hold exactly ceil(n * width / 8) bytes
// (DecodeError otherwise: they come from a payload).
int packed_codes_width(const py::buffer_info& info, std::size_t n, int width) {
  const int w = code_width(width);
  if (n > (std::numeric_limits<std::size_t>::max() - 7) / static_cast<std::size_t>(w) ||
      byte_size(info) != (n * static_cast<std::size_t>(w) + 7) / 8)
    throw fedpress::MalformedData("int section: " + std::to_string(byte_size(info)) + " bytes of codes, " +
                                  std::to_string(n) + " codes of " + std::to_string(w) + " bits need " +
                                  std::to_string((n * static_cast<std::size_t>(w) + 7) / 8));
  return w;
}

void register_intcode(py::module_& m) {
  m.def(
      "int_encode",
      [](const py::handle& x_obj, int bits, float clip, std::uint64_t seed, long long block,
         std::uint64_t rotation_seed, const py::handle& out_obj) {
        py::array x = checked<float>(x_obj, "x");
        if (bits < 1 || bits > 16) throw py::value_error("bits must be in [1, 16], got " + std::to_string(bits));
        if (!(std::isfinite(clip) && clip > 0.0f)) throw py::value_error("clip must be finite and positive");
        const std::size_t n = len(x);
        const std::size_t rotation_block = block == 0 ? 0 : rotate_block(block);
        py::array codes;
        if (out_obj.is_none()) {
          codes = py::array_t<std::uint64_t>(static_cast<py::ssize_t>(n));
        } else {
          codes = checked<std::uint64_t>(out_obj, "out", Access::write);
          if (len(codes) != n)
            throw py::value_error("out has " + std::to_string(len(codes)) + " elements, x " + std::to_string(n));
          if (py::module_::import("numpy").attr("shares_memory")(x, codes).cast<bool>())
            throw py::value_error("out must not share memory with x");
        }
        const float* xp = cptr<float>(x);
        auto* c = static_cast<std::uint64_t*>(codes.mutable_data());
        {
          py::gil_scoped_release release;  // raw buffers only
          if (rotation_block == 0 || n == 0)
            fedpress::int_encode(xp, n, bits, clip, seed, c);
          else
            fedpress::int_encode_rotated(xp, n, bits, clip, seed, rotation_block, rotation_seed, c);
        }
        return codes;
      },
      "x"_a, "bits"_a, "clip"_a, "seed"_a, "block"_a = 0, "rotation_seed"_a = 0, "out"_a = py::none(),
      "Integer levels of x on [-clip, clip] (2^bits levels, unbiased stochastic rounding seeded by seed), uint64; "
      "with block > 0, of x rotated as eden_rotate(block, rotation_seed) rotates it, without a rotated copy. "
      "With out (uint64, writable, len(x)), into it (partly written when it raises).");
  m.def(
      "pack_codes",
      [](const py::handle& codes_obj, int width) {
        py::array codes = checked<std::uint64_t>(codes_obj, "codes");
        const std::size_t n = len(codes);
        const int w = code_width(width);
        const std::size_t bytes = (n * static_cast<std::size_t>(w) + 7) / 8;
        py::array_t<std::uint8_t> out(static_cast<py::ssize_t>(bytes));
        const std::uint64_t* c = cptr<std::uint64_t>(codes);
        std::uint8_t* o = out.mutable_data();
        {
          py::gil_scoped_release release;  // raw buffers only
          fedpress::pack_codes(c, n, w, o);
        }
        return out;
      },
      "codes"_a, "width"_a, "The codes (uint64, each < 2^width), width bits each, LSB first, as uint8.");
  m.def(
      "unpack_codes",
      [](const py::buffer& data, std::size_t n, int width) {
        const py::buffer_info info = contiguous_bytes(data, "data");
        const int w = packed_codes_width(info, n, width);
        py::array_t<std::uint64_t> codes(static_cast<py::ssize_t>(n));
        const auto* p = static_cast<const std::uint8_t*>(info.ptr);
        std::uint64_t* c = codes.mutable_data();
        {
          py::gil_scoped_release release;  // raw buffers only
          fedpress::unpack_codes(p, n, w, c);
        }
        return codes;
      },
      "data"_a, "n"_a, "width"_a, "Inverse of pack_codes; DecodeError on a wrong size or nonzero padding bits.");
  m.def(
      "int_values",
      [](const py::buffer& data, std::size_t n, int width, int modulus_bits, double step, double offset,
         double weight) {
        const py::buffer_info info = contiguous_bytes(data, "data");
        const int w = packed_codes_width(info, n, width);
        if (modulus_bits < 0 || modulus_bits > 62)
          throw py::value_error("modulus_bits must be in [0, 62], got " + std::to_string(modulus_bits));
        py::array_t<float> out(static_cast<py::ssize_t>(n));
        const auto* p = static_cast<const std::uint8_t*>(info.ptr);
        float* o = out.mutable_data();
        {
          py::gil_scoped_release release;  // raw buffers only
          fedpress::int_values(p, n, w, modulus_bits, step, offset, weight, o);
        }
        return out;
      },
      "data"_a, "n"_a, "width"_a, "modulus_bits"_a, "step"_a, "offset"_a, "weight"_a,
      "The float32 values of n packed codes before the inverse rotation, without an array of codes: "
      "float32((t * step - offset) * weight) in double precision, t each code, or with modulus_bits m > 0 the "
      "code as a residue modulo 2^m read as t - 2^m from 2^m - 2^(m-2) up. DecodeError as unpack_codes.");
  m.def(
      "int_values_of",
      [](const py::handle& codes_obj, int modulus_bits, double step, double offset, double weight) {
        py::array codes = checked<std::uint64_t>(codes_obj, "codes");
        if (modulus_bits < 0 || modulus_bits > 62)
          throw py::value_error("modulus_bits must be in [0, 62], got " + std::to_string(modulus_bits));
        const std::size_t n = len(codes);
        py::array_t<float> out(static_cast<py::ssize_t>(n));
        const std::uint64_t* c = cptr<std::uint64_t>(codes);
        float* o = out.mutable_data();
        py::gil_scoped_release release;  // raw buffers only
        fedpress::int_values_of(c, n, modulus_bits, step, offset, weight, o);
        return out;
      },
      "codes"_a, "modulus_bits"_a, "step"_a, "offset"_a, "weight"_a,
      "int_values of codes given one per uint64 (a sum of codes; its residues modulo 2^m with modulus_bits m > 0).");
}

py::array_t<std::uint16_t> narrow(const py::handle& obj, void (*kernel)(const float*, std::size_t, void*)) {
  py::array in = checked<float>(obj, "x");
  const std::size_t n = len(in);
  py::array_t<std::uint16_t> out(static_cast<py::ssize_t>(n));
  std::uint16_t* o = out.mutable_data();
  py::gil_scoped_release release;  // raw buffers only
  kernel(cptr<float>(in), n, o);
  return out;
}

// h is usually a view of a payload section at an odd offset: the kernels read
// it at any address, so it is passed as it is, without a copy.
py::array_t<float> widen(const py::handle& obj, void (*kernel)(const void*, std::size_t, float*)) {
  py::array in = checked<std::uint16_t>(obj, "h", Access::read_any_address);
  const std::size_t n = len(in);
  py::array_t<float> out(static_cast<py::ssize_t>(n));
  float* o = out.mutable_data();
  py::gil_scoped_release release;  // raw buffers only
  kernel(in.data(), n, o);
  return out;
}

void register_convert(py::module_& m) {
  m.def(
      "decode_floats",
      [](const py::buffer& buf, const std::string& code, long long n_arg, const py::handle& out_obj) {
        py::buffer_info info = buf.request();
        if (info.ndim != 1 || info.strides[0] != info.itemsize)
          throw py::type_error("data must be a contiguous bytes-like object");
        const std::size_t n = length_arg(n_arg, "n");
        fedpress::FloatCode c;
        if (code == "fp32")
          c = fedpress::FloatCode::fp32;
        else if (code == "fp16")
          c = fedpress::FloatCode::fp16;
        else if (code == "bf16")
          c = fedpress::FloatCode::bf16;
        else
          throw py::value_error("code must be fp32, fp16 or bf16, got " + code);
        const std::size_t width = c == fedpress::FloatCode::fp32 ? 4 : 2;
        if (static_cast<std::size_t>(info.size * info.itemsize) != width * n)
          throw py::value_error("data holds " + std::to_string(info.size * info.itemsize) + " bytes, expected " +
                                std::to_string(width * n) + " for " + std::to_string(n) + " " + code + " values");
        py::array out = output_or_acc(out_obj, n);
        bool finite;
        {
          float* o = static_cast<float*>(out.mutable_data());
          py::gil_scoped_release release;
          finite = fedpress::decode_floats(c, info.ptr, n, o);
        }
        return py::make_tuple(out, finite);
      },
      "data"_a, "code"_a, "n"_a, "out"_a = py::none(),
      "A float value section (fp32/fp16/bf16, little-endian, at any address) as float32[n] (or into out), "
      "and whether every value is finite: (array, bool).");
  m.def(
      "to_half", [](const py::handle& x) { return narrow(x, fedpress::float_to_half); }, "x"_a,
      "float32 -> float16 bit patterns (uint16), round to nearest even, saturating at 65504.");
  m.def(
      "from_half", [](const py::handle& h) { return widen(h, fedpress::half_to_float); }, "h"_a,
      "float16 bit patterns (uint16) -> float32.");
  m.def(
      "to_bfloat16", [](const py::handle& x) { return narrow(x, fedpress::float_to_bfloat16); }, "x"_a,
      "float32 -> bfloat16 bit patterns (uint16), round to nearest even, saturating.");
  m.def(
      "from_bfloat16", [](const py::handle& h) { return widen(h, fedpress::bfloat16_to_float); }, "h"_a,
      "bfloat16 bit patterns (uint16) -> float32.");
}

// The bytes of a contiguous buffer (bytes, memoryview, numpy array), kept alive by the
// caller's list while the kernels read them.
struct ByteView {
  const void* data;
  std::size_t size;
};

ByteView byte_view(const py::handle& obj, std::size_t position) {
  py::buffer_info info = py::reinterpret_borrow<py::buffer>(obj).request();
  if (info.ndim > 1 || (info.ndim == 1 && info.strides[0] != info.itemsize))
    throw py::type_error("piece " + std::to_string(position) + " must be a contiguous bytes-like object");
  return {info.ptr, static_cast<std::size_t>(info.size * info.itemsize)};
}

// One client's sparse tensor straight from its payload: a version 2 index stream and its
// float32 values, read where they lie. Checked on construction (GIL released), or, when
// deferred, by check_payloads: right after its payload's checksum, while the payload's
// bytes are in cache, for many payloads in parallel. A batch's sum is then one pass over
// the payloads (add_streams).
class IndexStream {
 public:
  IndexStream(const py::handle& index_buf, std::uint64_t n, std::uint64_t count, const py::handle& value_buf,
              bool check_finite, bool deferred)
      : n_(n),
        count_(count),
        check_finite_(check_finite),
        index_(contiguous_bytes(index_buf, "index_stream")),
        values_info_(contiguous_bytes(value_buf, "values")) {
    if (n > kMaxLength + 1) throw py::value_error("n must be <= 2^32");
    if (byte_size(values_info_) / 4 != count || byte_size(values_info_) % 4 != 0)
      throw py::value_error("values hold " + std::to_string(byte_size(values_info_)) + " bytes, expected 4 * " +
                            std::to_string(count));
    if (deferred) return;
    py::gil_scoped_release release;
    check();
  }

  // A stream whose values are quantized codes (bits 1, 2, 4 or 8, packed as quantize packs
  // them) with one float32 scale per bucket, added as dequantize gives them, with no decoded
  // copy; checked as the float one is, the section's scales and padding too.
  IndexStream(const py::handle& index_buf, std::uint64_t n, std::uint64_t count, const py::handle& codes_buf,
              const py::handle& scales_buf, int bits, long long bucket, bool deferred)
      : n_(n),
        count_(count),
        check_finite_(false),
        bits_(bits),
        bucket_(bucket > 0 ? static_cast<std::size_t>(bucket) : 0),
        index_(contiguous_bytes(index_buf, "index_stream")),
        values_info_(contiguous_bytes(codes_buf, "codes")),
        scales_(checked<float>(scales_buf, "scales")) {  // (copied when not 4-byte aligned)
    if (n > kMaxLength + 1) throw py::value_error("n must be <= 2^32");
    if (bits != 1 && bits != 2 && bits != 4 && bits != 8)
      throw py::value_error("bits must be 1, 2, 4 or 8, got " + std::to_string(bits));
    if (bucket <= 0) throw py::value_error("bucket must be positive, got " + std::to_string(bucket));
    const std::size_t k = static_cast<std::size_t>(count);
    if (byte_size(values_info_) != fedpress::packed_size(k, bits))
      throw py::value_error("codes hold " + std::to_string(byte_size(values_info_)) + " bytes, expected " +
                            std::to_string(fedpress::packed_size(k, bits)));
    if (len(scales_) != fedpress::ceil_div(k, bucket_))
      throw py::value_error("scales hold " + std::to_string(len(scales_)) + " values, expected " +
                            std::to_string(fedpress::ceil_div(k, bucket_)));
    if (deferred) return;
    py::gil_scoped_release release;
    check();
  }

  // Checks the stream (and the values, with check_finite; a quantized section's scales and
  // padding): MalformedData names what is wrong. Needs no GIL.
  void check() {
    auto stream = std::make_unique<fedpress::RiceStream>(static_cast<const std::uint8_t*>(index_.ptr),
                                                         byte_size(index_), n_, count_, true);
    if (stream->count() != count_)
      throw fedpress::MalformedData("index stream holds " + std::to_string(stream->count()) + " indices, expected " +
                                    std::to_string(count_));
    if (check_finite_ && !fedpress::floats_finite(values(), static_cast<std::size_t>(count_)))
      throw fedpress::MalformedData("values section decodes to non-finite values (NaN or infinity)");
    if (bits_ != 0) {
      for (std::size_t b = 0; b < fedpress::ceil_div(static_cast<std::size_t>(count_), bucket_); ++b)
        if (!scale_is_sound(scales()[b]))
          throw fedpress::MalformedData("values section holds a negative or non-finite scale");
      if (!padding_is_clear(values(), static_cast<std::size_t>(count_), bits_))
        throw fedpress::MalformedData("values section: nonzero padding bits in the last byte");
    }
    stream_ = std::move(stream);
  }

  std::uint64_t size() const { return n_; }
  std::uint64_t count() const { return count_; }
  bool is_checked() const { return stream_ != nullptr; }
  fedpress::StreamUpdate update(float weight) const {
    return {stream_.get(), values(), weight, bits_, bits_ != 0 ? scales() : nullptr, bucket_};
  }
  // What a kernel reads: the index stream's bytes and the values' (codes and scales).
  void add_read_spans(Spans& spans) const {
    spans.add(index_.ptr, byte_size(index_), false);
    spans.add(values_info_.ptr, byte_size(values_info_), false);
    if (bits_ != 0) spans.add(scales_, false);
  }

 private:
  const std::uint8_t* values() const { return static_cast<const std::uint8_t*>(values_info_.ptr); }
  const float* scales() const { return cptr<float>(scales_); }

  std::uint64_t n_, count_;
  bool check_finite_;
  int bits_ = 0;  // 0: float32 values
  std::size_t bucket_ = 0;
  // The exports, not just the objects, are held: that keeps a bytearray from being
  // resized under the stream.
  py::buffer_info index_, values_info_;
  py::array scales_;                              // a quantized stream's, aligned
  std::unique_ptr<fedpress::RiceStream> stream_;  // null until checked
};

// One payload of check_payloads: its checksummed bytes (if its checksum is deferred), the
// float jobs run on the way, and its deferred streams.
struct PayloadCheck {
  std::optional<py::buffer_info> bytes;
  std::optional<DecodingJobs> jobs;
  std::vector<IndexStream*> streams;
  std::uint32_t crc = 0;
  std::optional<std::size_t> failed_stream;
  std::string error;

  void run(bool parallel_checksum) {
    if (bytes) {
      const auto* data = static_cast<const std::uint8_t*>(bytes->ptr);
      crc = fedpress::crc32c_with_jobs(data, byte_size(*bytes), jobs->jobs, 0, parallel_checksum);
    }
    for (std::size_t s = 0; s < streams.size(); ++s) {
      if (streams[s]->is_checked()) continue;
      try {
        streams[s]->check();
      } catch (const fedpress::MalformedData& e) {
        failed_stream = s;
        error = e.what();
        return;
      }
    }
  }
};

void register_streams(py::module_& m) {
  py::class_<IndexStream>(m, "IndexStream",
                          "A version 2 index stream of n-element tensor and its count float32 values (little-endian "
                          "bytes at any address, or a float32 array), checked on construction: DecodeError names "
                          "what is wrong; check_finite also refuses NaN and infinity among the values. A deferred "
                          "stream is checked by check_payloads.")
      .def(py::init<const py::handle&, std::uint64_t, std::uint64_t, const py::handle&, bool, bool>(), "index_stream"_a,
           "n"_a, "count"_a, "values"_a, "check_finite"_a, "deferred"_a = false)
      .def_static(
          "quantized",
          [](const py::handle& index_buf, std::uint64_t n, std::uint64_t count, const py::handle& codes,
             const py::handle& scales, int bits, long long bucket, bool deferred) {
            return std::make_unique<IndexStream>(index_buf, n, count, codes, scales, bits, bucket, deferred);
          },
          "index_stream"_a, "n"_a, "count"_a, "codes"_a, "scales"_a, "bits"_a, "bucket"_a, "deferred"_a = false,
          "A stream whose count values are quantized codes (bits 1, 2, 4 or 8, packed as quantize packs them; "
          "bytes at any address) with one float32 scale per bucket: added as dequantize gives them, bit for bit, "
          "with no decoded copy. Checked as the float one is, and its scales (finite, >= 0) and padding bits.")
      .def_property_readonly("n", &IndexStream::size)
      .def_property_readonly("count", &IndexStream::count)
      .def_property_readonly("checked", &IndexStream::is_checked);
  m.def(
      "check_payloads",
      [](const py::sequence& items_in) {
        std::vector<PayloadCheck> items(py::len(items_in));
        std::unordered_set<const IndexStream*> seen;  // two threads must not check one stream
        for (std::size_t i = 0; i < items.size(); ++i) {
          const py::tuple t = py::reinterpret_borrow<py::tuple>(items_in[i]);
          if (t.size() != 3) throw py::value_error("an item is (bytes or None, jobs, streams)");
          PayloadCheck& item = items[i];
          if (!t[0].is_none()) {
            item.bytes = contiguous_bytes(t[0], "bytes");
            item.jobs.emplace(static_cast<const std::uint8_t*>(item.bytes->ptr), byte_size(*item.bytes),
                              py::reinterpret_borrow<py::sequence>(t[1]));
          } else if (py::len(t[1]) != 0) {
            throw py::value_error("item " + std::to_string(i) + " has jobs but no bytes");
          }
          for (const py::handle& s : py::reinterpret_borrow<py::sequence>(t[2])) {
            auto* stream = s.cast<IndexStream*>();
            if (stream == nullptr) throw py::type_error("a stream is None");
            if (!seen.insert(stream).second) throw py::value_error("a stream is listed twice");
            item.streams.push_back(stream);
          }
        }
        {
          py::gil_scoped_release release;
          // Many payloads: one per thread, each checksummed serially (no nested threads);
          // a few large ones: one after another, each checksum in parallel pieces.
          const bool per_thread = items.size() >= 2 * static_cast<std::size_t>(fedpress::num_threads());
          if (per_thread)
            fedpress::parallel_for(items.size(), [&](std::size_t i) { items[i].run(false); });
          else
            for (PayloadCheck& item : items) item.run(true);
        }
        py::list out;
        for (const PayloadCheck& item : items) {
          out.append(
              py::make_tuple(item.bytes ? py::object(py::int_(item.crc)) : py::object(py::none()),
                             item.jobs ? py::object(item.jobs->flags()) : py::object(py::list()),
                             item.failed_stream ? py::object(py::int_(*item.failed_stream)) : py::object(py::none()),
                             py::str(item.error)));
        }
        return out;
      },
      "items"_a,
      "Checks many payloads at once, in parallel without the GIL: items are (bytes or None, jobs, streams). For "
      "each, the CRC-32C of bytes (jobs as for crc32c_decoding run on the way), then its deferred IndexStreams "
      "checked in order until one fails. Returns per item (crc or None, [each job's values finite], index of the "
      "failed stream or None, its error).");
  m.def(
      "add_streams",
      [](const py::handle& acc_obj, const std::vector<const IndexStream*>& streams,
         const std::vector<double>& weights) {
        py::array acc = checked<float>(acc_obj, "acc", Access::write);
        if (weights.size() != streams.size())
          throw py::value_error("streams and weights lengths differ: " + std::to_string(streams.size()) + " vs " +
                                std::to_string(weights.size()));
        std::vector<fedpress::StreamUpdate> updates;
        for (std::size_t c = 0; c < streams.size(); ++c) {
          if (streams[c] == nullptr) throw py::type_error("streams[" + std::to_string(c) + "] is None");
          if (!streams[c]->is_checked())
            throw py::value_error("streams[" + std::to_string(c) + "] is deferred and was not checked");
          if (streams[c]->size() != len(acc))
            throw py::value_error("streams[" + std::to_string(c) + "] indexes " + std::to_string(streams[c]->size()) +
                                  " values, acc holds " + std::to_string(len(acc)));
          updates.push_back(streams[c]->update(static_cast<float>(weights[c])));
        }
        float* a = mptr<float>(acc);
        py::gil_scoped_release release;  // the streams keep their buffers; the caller keeps them alive
        fedpress::scatter_add_streams(a, len(acc), updates);
      },
      "acc"_a, "streams"_a, "weights"_a,
      "For each stream c in order: acc[indices] += weights[c] * values, decoding the streams as they are added, "
      "cache-blocked like scatter_add_many.");
  m.def(
      "add_streams_each",
      [](const py::sequence& groups) {
        const std::size_t count = py::len(groups);
        std::vector<py::array> accs;
        std::vector<fedpress::StreamSum> sums;
        Spans spans;
        for (std::size_t g = 0; g < count; ++g) {
          const std::string where = "groups[" + std::to_string(g) + "]";
          const py::tuple t = py::reinterpret_borrow<py::tuple>(groups[g]);
          if (t.size() != 3 && t.size() != 4)
            throw py::value_error(where + " must be (acc, streams, weights) or (acc, streams, weights, divisor)");
          accs.push_back(checked<float>(t[0], (where + " acc").c_str(), Access::write));
          py::array& acc = accs.back();
          const auto streams = t[1].cast<std::vector<const IndexStream*>>();
          const auto weights = t[2].cast<std::vector<double>>();
          if (weights.size() != streams.size())
            throw py::value_error(where + ": streams and weights lengths differ: " + std::to_string(streams.size()) +
                                  " vs " + std::to_string(weights.size()));
          fedpress::StreamSum sum{mptr<float>(acc), len(acc), {}};
          if (t.size() == 4 && !t[3].is_none()) {
            const double divisor = t[3].cast<double>();
            if (!std::isfinite(divisor) || divisor <= 0)
              throw py::value_error(where + " divisor must be finite and > 0, got " + std::to_string(divisor));
            sum.divide_after = true;
            sum.divisor = static_cast<float>(divisor);
          }
          for (std::size_t c = 0; c < streams.size(); ++c) {
            const std::string which = where + " stream " + std::to_string(c);
            if (streams[c] == nullptr) throw py::type_error(which + " is None");
            if (!streams[c]->is_checked()) throw py::value_error(which + " is deferred and was not checked");
            if (streams[c]->size() != len(acc))
              throw py::value_error(which + " indexes " + std::to_string(streams[c]->size()) + " values, acc holds " +
                                    std::to_string(len(acc)));
            sum.updates.push_back(streams[c]->update(static_cast<float>(weights[c])));
            streams[c]->add_read_spans(spans);
          }
          spans.add(acc, true);
          sums.push_back(std::move(sum));
        }
        spans.check("an accumulator shares memory with another accumulator, or with a stream's bytes or values");
        py::gil_scoped_release release;  // the streams keep their buffers; the caller keeps them alive
        fedpress::scatter_add_streams_each(sums);
      },
      "groups"_a,
      "add_streams for each (acc, streams, weights) group, every accumulator its own, in one call: the groups' "
      "ranges are spread over the threads together (a model's sparse tensors). Accumulators must not overlap each "
      "other or what the streams read. A group (acc, streams, weights, divisor) then divides its acc by divisor "
      "(float32, as divide does), each range right after its last addition (a mean in the sum's pass).");
}

// A kernel piece's bucket: 1 .. 2^32 - 1, the largest a payload's table records (a bucket
// near 2^64 would wrap the kernels' bucket arithmetic around).
std::size_t piece_bucket(const py::handle& value, std::size_t i) {
  const std::uint64_t bucket = field<std::uint64_t>(value, "piece " + std::to_string(i) + ": bucket");
  if (bucket == 0 || bucket > kMaxLength)
    throw py::value_error("piece " + std::to_string(i) + ": bucket must be in [1, 2^32 - 1], got " +
                          std::to_string(bucket));
  return static_cast<std::size_t>(bucket);
}

void register_assemble(py::module_& m) {
  m.def(
      "assemble",
      [](const py::list& items, bool checksum) {
        // Parsed under the GIL: each item is a buffer (copied) or a tuple naming the
        // kernel that writes it, ("q", x, bits, bucket, seed), ("rq", x, bits, bucket, seed, rotation_block,
        // rotation_seed) (the quantize section of rht(x)), ("int", x, bits, clip, seed, block, rotation_seed)
        // (an unmasked intB section's codes), ("sign", x, bucket), ("f16", x), ("bf16", x),
        // ("eden", x, bits, block, rotation_seed, quant_seed, mode), ("rice", indices, n, parameter, size)
        // (an index stream as plan_indices_many planned it) or ("move", buffer) (a writable buffer of
        // private memory, made for this payload alone, copied and its pages handed back as they
        // are: on Linux it reads as zeros afterwards).
        std::vector<fedpress::Piece> pieces;
        std::vector<py::object> keep;  // the float32 arrays the kernels read
        // The move pieces' buffers, held (exported) until they are written: a bytearray then
        // cannot be resized or freed by another thread while its pages are copied and dropped.
        std::vector<py::buffer_info> held;
        pieces.reserve(items.size());
        for (std::size_t i = 0; i < items.size(); ++i) {
          py::handle item = items[i];
          fedpress::Piece p;
          if (!py::isinstance<py::tuple>(item)) {
            const ByteView v = byte_view(item, i);
            p.data = v.data;
            p.n = v.size;
            pieces.push_back(p);
            continue;
          }
          const py::tuple t = py::reinterpret_borrow<py::tuple>(item);
          const std::string kind = t[0].cast<std::string>();
          if (kind == "move") {
            if (t.size() != 2)
              throw py::value_error("piece " + std::to_string(i) + ": a move piece is (\"move\", buffer)");
            py::buffer_info info;
            try {
              info = py::reinterpret_borrow<py::buffer>(t[1]).request(/*writable=*/true);
            } catch (const py::error_already_set&) {
              throw py::type_error("piece " + std::to_string(i) + ": a move piece's buffer must be writable");
            }
            if (info.ndim > 1 || (info.ndim == 1 && info.strides[0] != info.itemsize))
              throw py::type_error("piece " + std::to_string(i) + " must be a contiguous bytes-like object");
            p.kind = fedpress::PieceKind::moved;
            p.data = info.ptr;
            p.n = static_cast<std::size_t>(info.size * info.itemsize);
            held.push_back(std::move(info));
            pieces.push_back(p);
            continue;
          }
          if (kind == "rice") {  // (its size is checked as it is written)
            if (t.size() != 5)
              throw py::value_error("piece " + std::to_string(i) +
                                    ": a rice piece is (\"rice\", indices, n, parameter, size)");
            py::array idx = checked<std::uint32_t>(t[1], "indices");
            p.kind = fedpress::PieceKind::rice;
            p.data = idx.data();
            p.n = len(idx);
            p.seed = field<std::uint64_t>(t[2], "piece " + std::to_string(i) + ": n");
            if (p.seed > kMaxLength + 1) throw py::value_error("piece " + std::to_string(i) + ": n must be <= 2^32");
            p.bits = field<int>(t[3], "piece " + std::to_string(i) + ": parameter");
            const std::uint64_t planned = field<std::uint64_t>(t[4], "piece " + std::to_string(i) + ": size");
            // A stream of k indices < 2^32 takes at most its count, a parameter byte, 31-bit
            // lows and k + 2^32 unary bits: a larger size is no plan of theirs (and would make
            // the payload's size wrap around).
            const std::size_t k = p.n, most = 11 + (31 * k + 7) / 8 + (k + (std::size_t{1} << 32) + 7) / 8;
            if (planned > most)
              throw py::value_error("piece " + std::to_string(i) + ": a stream of " + std::to_string(k) +
                                    " indices takes at most " + std::to_string(most) + " bytes, not " +
                                    std::to_string(planned));
            p.planned = static_cast<std::size_t>(planned);
            keep.push_back(idx);
            pieces.push_back(p);
            continue;
          }
          py::array x = checked<float>(t[1], "x");
          p.data = x.data();
          p.n = len(x);
          keep.push_back(x);
          if (kind == "q" && t.size() == 5) {
            p.kind = fedpress::PieceKind::quantize;
            p.bits = t[2].cast<int>();
            p.block = piece_bucket(t[3], i);
            p.seed = t[4].cast<std::uint64_t>();
          } else if (kind == "rq" && t.size() == 7) {
            p.kind = fedpress::PieceKind::rotated_quantize;
            p.bits = t[2].cast<int>();
            p.block = piece_bucket(t[3], i);
            p.seed = t[4].cast<std::uint64_t>();
            p.rotation_block = t[5].cast<std::size_t>();
            p.rotation_seed = t[6].cast<std::uint64_t>();
          } else if (kind == "int" && t.size() == 7) {
            p.kind = fedpress::PieceKind::int_codes;
            p.bits = t[2].cast<int>();
            p.clip = t[3].cast<float>();
            p.seed = t[4].cast<std::uint64_t>();
            p.rotation_block = t[5].cast<std::size_t>();
            p.rotation_seed = t[6].cast<std::uint64_t>();
          } else if (kind == "sign" && t.size() == 3) {
            p.kind = fedpress::PieceKind::sign;
            p.block = piece_bucket(t[2], i);
          } else if (kind == "f16" && t.size() == 2) {
            p.kind = fedpress::PieceKind::half;
          } else if (kind == "bf16" && t.size() == 2) {
            p.kind = fedpress::PieceKind::bfloat16;
          } else if (kind == "eden" && t.size() == 7) {
            p.kind = fedpress::PieceKind::eden;
            p.bits = eden_bits(t[2].cast<int>());
            p.block = rotate_block(t[3].cast<long long>());
            p.seed = t[4].cast<std::uint64_t>();
            p.quant_seed = t[5].cast<std::uint64_t>();
            p.mode = t[6].cast<std::uint8_t>();
          } else {
            throw py::value_error("piece " + std::to_string(i) + ": unknown kernel piece " +
                                  py::repr(item).cast<std::string>());
          }
          pieces.push_back(p);
        }
        std::size_t total = checksum ? 4 : 0;
        for (std::size_t i = 0; i < pieces.size(); ++i) try {
            total += fedpress::piece_size(pieces[i]);
          } catch (const std::invalid_argument& e) {
            throw py::value_error("piece " + std::to_string(i) + ": " + e.what());
          }
        PyObject* raw = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(total));
        if (raw == nullptr) throw py::error_already_set();
        py::bytes out = py::reinterpret_steal<py::bytes>(raw);
        auto* o = reinterpret_cast<std::uint8_t*>(PyBytes_AS_STRING(raw));  // not yet seen by anyone
        {
          py::gil_scoped_release release;  // the kernels touch raw buffers kept alive above
          std::uint32_t crc = 0;
          const std::size_t body = fedpress::assemble(pieces, o, checksum ? &crc : nullptr);
          if (checksum) std::memcpy(o + body, &crc, 4);  // little-endian hosts
        }
        return out;
      },
      "pieces"_a, "checksum"_a,
      "The pieces written into one new bytes object, value sections by their kernels in place; "
      "with checksum, the CRC-32C of everything before it appended (little-endian).");
}

void register_table(py::module_& m) {
  m.def(
      "read_table",
      [](const py::buffer& body, std::size_t pos, std::size_t n, bool heads, std::size_t max_dims) -> py::object {
        const py::buffer_info info = contiguous_bytes(body, "body");
        const auto* data = static_cast<const std::uint8_t*>(info.ptr);
        const std::size_t size = byte_size(info);
        // Each entry takes at least 8 bytes (3 code bytes and 5 varints): a count the body
        // cannot hold is the Python reader's to report, before anything is allocated.
        if (pos > size || n > (size - pos) / 8) return py::none();
        std::vector<fedpress::TableEntry> entries;
        std::size_t end = 0;
        if (!fedpress::read_table(data, size, pos, n, heads, max_dims, entries, end)) return py::none();
        py::list rows;
        for (const fedpress::TableEntry& e : entries) {
          py::tuple shape(e.shape.size());
          for (std::size_t d = 0; d < e.shape.size(); ++d) shape[d] = py::int_(e.shape[d]);
          py::object name = heads ? py::object(py::bytes(reinterpret_cast<const char*>(data + e.name_offset),
                                                         static_cast<py::ssize_t>(e.name_length)))
                                  : py::object(py::none());
          rows.append(py::make_tuple(name, e.dtype, shape, e.kind, e.value_code, e.flags, e.count, e.bucket, e.block,
                                     e.index_length, e.value_length));
        }
        return py::make_tuple(end, rows);
      },
      "body"_a, "pos"_a, "n"_a, "heads"_a, "max_dims"_a,
      "A payload's tensor table as written, n entries from body[pos:] (with heads: name bytes, dtype "
      "code, shape): (end, [(name, dtype, shape, kind, value code, flags, count, bucket, block, index "
      "length, values length)]), or None for a table it cannot read (the Python reader reports why).");
  m.def(
      "write_table",
      [](const py::bytes& prefix, const py::sequence& rows) {
        const std::string_view start = prefix;
        std::vector<std::uint8_t> out(start.begin(), start.end());
        const std::size_t count = py::len(rows);
        out.reserve(out.size() + 32 * count);
        for (std::size_t i = 0; i < count; ++i) {
          const py::tuple t = py::reinterpret_borrow<py::tuple>(rows[i]);
          if (t.size() != 9)
            throw py::value_error("rows[" + std::to_string(i) +
                                  "] must be (head, kind, value code, flags, count, bucket, block, index length, "
                                  "values length)");
          std::string_view head;
          if (!t[0].is_none()) {
            if (!PyBytes_Check(t[0].ptr()))
              throw py::type_error("rows[" + std::to_string(i) + "]: a head is bytes or None");
            head = t[0].cast<std::string_view>();
          }
          const auto byte = [&](std::size_t k) {
            const long long v = t[k].cast<long long>();
            if (v < 0 || v > 255)
              throw py::value_error("rows[" + std::to_string(i) + "]: a code byte is " + std::to_string(v));
            return static_cast<std::uint8_t>(v);
          };
          const auto number = [&](std::size_t k) -> std::uint64_t {
            const py::handle h = t[k];
            if (!PyLong_Check(h.ptr()))
              throw py::type_error("rows[" + std::to_string(i) + "]: field " + std::to_string(k) +
                                   " must be an integer, got " +
                                   std::string(py::str(py::type::of(h).attr("__name__"))));
            const unsigned long long v = PyLong_AsUnsignedLongLong(h.ptr());
            if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
              PyErr_Clear();
              throw py::value_error("rows[" + std::to_string(i) + "]: field " + std::to_string(k) + " is " +
                                    std::string(py::str(h)) + ", outside [0, 2^64)");
            }
            return static_cast<std::uint64_t>(v);
          };
          fedpress::EntryFields e;
          e.kind = byte(1);
          e.value_code = byte(2);
          e.flags = byte(3);
          e.count = number(4);
          e.bucket = number(5);
          e.block = number(6);
          e.index_length = number(7);
          e.value_length = number(8);
          fedpress::write_entry(out, reinterpret_cast<const std::uint8_t*>(head.data()), head.size(), e);
        }
        return py::bytes(reinterpret_cast<const char*>(out.data()), static_cast<py::ssize_t>(out.size()));
      },
      "prefix"_a, "rows"_a,
      "A payload's tensor table, as the writer writes it: prefix (the spec and entry count, coded), then per row "
      "(head bytes or None for a compact entry, kind, value code, flags, count, bucket, block, index length, "
      "values length) the head and the fields (three bytes, five varints).");
}

void register_runtime(py::module_& m) {
  m.def("num_threads", &fedpress::num_threads, "Threads the kernels may use.");
  m.def(
      "set_num_threads",
      [](int n) {
        if (n < 1) throw py::value_error("number of threads must be >= 1, got " + std::to_string(n));
        fedpress::set_num_threads(n);
      },
      "n"_a, "Sets the threads the kernels may use (results do not depend on it).");
  m.def(
      "simd", []() { return fedpress::simd_name(fedpress::active_simd()); },
      "The instruction set the selection kernels use now.");
  m.def(
      "simd_detected", []() { return fedpress::simd_name(fedpress::detected_simd()); },
      "The best instruction set this CPU offers.");
  m.def(
      "set_simd",
      [](const std::string& name) {
        if (name == "scalar")
          fedpress::set_simd_cap(fedpress::SimdLevel::scalar);
        else if (name == "avx2")
          fedpress::set_simd_cap(fedpress::SimdLevel::avx2);
        else if (name == "avx512")
          fedpress::set_simd_cap(fedpress::SimdLevel::avx512);
        else
          throw py::value_error("simd level must be 'scalar', 'avx2' or 'avx512', got '" + name + "'");
      },
      "name"_a, "Caps the explicitly dispatched SIMD paths (for tests and benchmarks).");
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "fedpress compiled kernels (use fedpress.ops)";
  // Malformed bytes in a stream a kernel parses: fedpress.DecodeError (a ValueError), the
  // class the payload reader raises too, so every decode path raises the same error.
  py::register_exception<fedpress::MalformedData>(m, "DecodeError", PyExc_ValueError);
  register_topk(m);
  register_quantize(m);
  register_indexcode(m);
  register_accumulate(m);
  register_checksum(m);
  register_table(m);
  register_convert(m);
  register_rotate(m);
  register_eden(m);
  register_intcode(m);
  register_assemble(m);
  register_streams(m);
  register_runtime(m);
}
