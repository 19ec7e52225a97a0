#include "indexcode.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "bits.hpp"
#include "rng.hpp"
#include "varint.hpp"

#if defined(__GNUC__)
#define FEDPRESS_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FEDPRESS_ALWAYS_INLINE inline
#endif

namespace fedpress {
namespace {

unsigned ceil_log2(std::uint64_t m) {
  unsigned b = 0;
  while ((std::uint64_t{1} << b) < m) ++b;
  return b;
}

// gap / m and gap % m for gaps below 2^32 and 1 <= m <= 2^32 without a hardware
// division (tens of cycles, once per index): Lemire, Kaser and Kurz's direct
// computation, q = mulhi(ceil(2^64 / m), gap), exact for 32-bit numerators.
struct DivideBy {
  std::uint64_t m, magic;
  explicit DivideBy(std::uint64_t m_) : m(m_), magic(m_ == 1 ? 0 : ~std::uint64_t{0} / m_ + 1) {}
  void divmod(std::uint64_t gap, std::uint64_t& q, std::uint64_t& r) const {
    q = m == 1 ? gap : mulhi64(magic, gap);
    r = gap - q * m;
  }
};

struct Golomb {
  std::uint64_t m;
  unsigned b;       // ceil(log2 m)
  std::uint64_t u;  // 2^b - m: remainders below u take b-1 bits
  explicit Golomb(std::uint64_t m_) : m(m_), b(ceil_log2(m_)), u((std::uint64_t{1} << b) - m_) {}
  std::uint64_t remainder_bits(std::uint64_t r) const { return b == 0 ? 0 : (r < u ? b - 1 : b); }
};

class BitWriter {
 public:
  explicit BitWriter(std::uint8_t* out) : out_(out) {}
  // nb <= 32
  void put(std::uint64_t v, unsigned nb) {
    acc_ |= v << fill_;
    fill_ += nb;
    if (fill_ >= 32) {
      const std::uint32_t low = static_cast<std::uint32_t>(acc_);
      std::memcpy(out_ + pos_, &low, 4);  // little-endian hosts; see encode_indices
      pos_ += 4;
      acc_ >>= 32;
      fill_ -= 32;
    }
  }
  void put_zeros(std::uint64_t count) {
    while (count >= 32) {
      put(0, 32);
      count -= 32;
    }
    put(0, static_cast<unsigned>(count));
  }
  void flush() {
    while (fill_ > 0) {
      out_[pos_++] = static_cast<std::uint8_t>(acc_);
      acc_ >>= 8;
      fill_ = fill_ >= 8 ? fill_ - 8 : 0;
    }
  }
  std::size_t bytes() const { return pos_; }
  std::uint64_t bits() const { return std::uint64_t{pos_} * 8 + fill_; }

 private:
  std::uint8_t* out_;
  std::size_t pos_ = 0;
  std::uint64_t acc_ = 0;
  unsigned fill_ = 0;
};

bool little_endian() {
  const std::uint16_t one = 1;
  std::uint8_t first;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

// One index stream being decoded, code by code, resumable: the fast path decodes a
// whole code from one 8-byte read when it lies away from the end of the buffer, the
// checked path anything else (long quotients, the last bytes) and every error.
class GolombDecoder {
 public:
  // Reads and checks the header; allocates nothing. Codes go to out (count() of them).
  GolombDecoder(const std::uint8_t* data, std::size_t size, std::uint64_t n, std::uint64_t max_count) : n_(n) {
    if (n > (std::uint64_t{1} << 32)) throw std::invalid_argument("n must be <= 2^32");  // indices are uint32
    std::size_t pos = 0;
    k_ = get_varint(data, size, pos, "count");
    if (k_ > n) throw MalformedData("index stream: count " + std::to_string(k_) + " exceeds n = " + std::to_string(n));
    if (k_ > max_count)
      throw MalformedData("index stream: count " + std::to_string(k_) + " exceeds the limit " +
                          std::to_string(max_count));
    if (k_ == 0) {
      if (pos != size)
        throw MalformedData("index stream: " + std::to_string(size - pos) + " trailing bytes after an empty list");
      return;
    }
    m_ = get_varint(data, size, pos, "golomb parameter");
    if (m_ == 0 || m_ > std::max<std::uint64_t>(1, n))
      throw MalformedData("index stream: golomb parameter " + std::to_string(m_) + " outside [1, " +
                          std::to_string(std::max<std::uint64_t>(1, n)) + "]");
    // Every index costs at least one bit (its unary terminator): a count the
    // buffer cannot hold is refused before anything is allocated.
    const std::uint64_t avail_bits = std::uint64_t{size - pos} * 8;
    if (k_ > avail_bits)
      throw MalformedData("index stream truncated: count " + std::to_string(k_) + " needs at least " +
                          std::to_string(k_) + " bits, have " + std::to_string(avail_bits));
    const Golomb g(m_);
    b_ = g.b;
    u_ = g.u;
    low_mask_ = g.b > 0 ? (std::uint64_t{1} << (g.b - 1)) - 1 : 0;
    data_ = data + pos;
    size_ = size - pos;
  }

  std::uint64_t count() const { return k_; }
  void start(std::uint32_t* out) { out_ = out; }
  bool done() const { return i_ == k_; }
  // Whether the next 8 bytes lie in the buffer: the fast path's precondition.
  bool inside() const { return (pos_ >> 3) + 8 <= size_; }

  // Decodes the next code if the fast path can; false (nothing consumed) otherwise.
  FEDPRESS_ALWAYS_INLINE bool fast_step() {
    if (i_ == k_ || !inside()) return false;
    std::uint64_t w;
    std::memcpy(&w, data_ + (pos_ >> 3), 8);  // little-endian hosts only (checked by the encoder)
    w >>= (pos_ & 7);
    if (w == 0) return false;
    const unsigned z = ctz64(w);
    if (z + 1 + b_ > 57) return false;  // 57 valid bits after the shift
    // The truncated-binary remainder without a branch on its value (which is random:
    // a branch there mispredicts about as often as not).
    std::uint64_t used = z + 1;
    std::uint64_t r = 0;
    if (b_ > 0) {
      const std::uint64_t v = (w >> used) & low_mask_;
      used += b_ - 1;
      const std::uint64_t wide = v >= u_ ? 1 : 0;
      const std::uint64_t longer = ((v << 1) | ((w >> used) & 1)) - u_;
      r = wide ? longer : v;
      used += wide;
    }
    // z < 57 and m, next, r <= 2^32 (n <= 2^32): the sum cannot wrap.
    const std::uint64_t value = next_ + std::uint64_t{z} * m_ + r;
    if (value >= n_) return false;  // the checked path says what is wrong
    out_[i_++] = static_cast<std::uint32_t>(value);
    next_ = value + 1;
    pos_ += used;
    return true;
  }

  // Decodes the next code through every check; throws MalformedData on a malformed one.
  void slow_step() {
    if (next_ >= n_)
      throw MalformedData("index stream: index " + std::to_string(i_) + " would be >= n = " + std::to_string(n_));
    // Unary quotient: count zero bits up to the terminating one.
    std::uint64_t q = 0;
    for (;;) {
      const std::uint64_t w = peek();
      const std::uint64_t left = total() - pos_;
      if (w != 0) {
        const std::uint64_t z = std::uint64_t{ctz64(w)};
        if (z >= left) require(z + 1, "unary quotient");
        q += z;
        pos_ += z + 1;
        break;
      }
      const std::uint64_t span = std::min<std::uint64_t>(56, left);
      if (span == 0) require(1, "unary quotient");
      q += span;
      pos_ += span;
      if (q > n_) break;  // a quotient this large already points past n
    }
    std::uint64_t r = 0;
    if (b_ > 0) {
      const std::uint64_t v = read(b_ - 1, "remainder");
      r = v < u_ ? v : ((v << 1) | read(1, "remainder")) - u_;
    }
    // next < n here, so q * m + r < n - next decides validity; q is compared
    // by division first because q * m can exceed 2^64 (n = m = 2^32).
    const std::uint64_t room = n_ - next_;
    const bool beyond = q > room / m_;
    const std::uint64_t value = beyond ? 0 : next_ + q * m_ + r;
    if (beyond || value >= n_)
      throw MalformedData("index stream: index " + std::to_string(i_) + " decodes to " +
                          (beyond ? std::string("beyond n") : std::to_string(value)) + ", n = " + std::to_string(n_));
    out_[i_++] = static_cast<std::uint32_t>(value);
    next_ = value + 1;
  }

  // Decodes everything left, then checks that the stream ends exactly there.
  void run() {
    while (!done())
      if (!fast_step()) slow_step();
    finish();
  }

  // After the last code: throws unless the stream was consumed exactly, padding zero.
  void finish() const {
    if (k_ == 0) return;
    const std::uint64_t used_bytes = (pos_ + 7) / 8;
    if (used_bytes != size_)
      throw MalformedData("index stream: " + std::to_string(size_ - used_bytes) + " trailing bytes after " +
                          std::to_string(k_) + " indices");
    if (pos_ % 8 != 0 && (data_[size_ - 1] >> (pos_ % 8)) != 0)
      throw MalformedData("index stream: nonzero padding bits in the last byte");
  }

 private:
  std::uint64_t total() const { return std::uint64_t{size_} * 8; }
  // The next (up to) 57 bits starting at the current position, zero past the end.
  std::uint64_t peek() const {
    const std::size_t byte = static_cast<std::size_t>(pos_ >> 3);
    std::uint64_t w = 0;
    if (byte + 8 <= size_) {
      std::memcpy(&w, data_ + byte, 8);
    } else {
      for (std::size_t i = size_; i-- > byte;) w = (w << 8) | data_[i];
    }
    return w >> (pos_ & 7);
  }
  void require(std::uint64_t nb, const char* what) const {
    if (pos_ + nb > total())
      throw MalformedData(std::string("index stream truncated in ") + what + ": need " + std::to_string(nb) +
                          " bits at bit " + std::to_string(pos_) + ", have " + std::to_string(total() - pos_));
  }
  std::uint64_t read(unsigned nb, const char* what) {
    if (nb == 0) return 0;
    require(nb, what);
    const std::uint64_t v = peek() & ((std::uint64_t{1} << nb) - 1);
    pos_ += nb;
    return v;
  }

  std::uint64_t n_;
  std::uint64_t k_ = 0, m_ = 1, u_ = 0, low_mask_ = 0;
  unsigned b_ = 0;
  const std::uint8_t* data_ = nullptr;
  std::size_t size_ = 0;
  std::uint64_t pos_ = 0;   // bits consumed after the header
  std::uint64_t next_ = 0;  // smallest value the next index may take
  std::uint64_t i_ = 0;     // indices decoded
  std::uint32_t* out_ = nullptr;
};

}  // namespace

std::vector<std::uint32_t> index_gaps(const std::uint32_t* idx, std::size_t k, std::uint64_t n) {
  if (!little_endian()) throw std::runtime_error("fedpress index coding needs a little-endian host");
  if (k > n) throw std::invalid_argument("more indices than n");
  std::vector<std::uint32_t> gaps(k);
  for (std::size_t i = 0; i < k; ++i) gaps[i] = checked_gap(idx, i, n);
  return gaps;
}

void throw_bad_index(const std::uint32_t* idx, std::size_t i, std::uint64_t n) {
  if (idx[i] >= n)
    throw std::invalid_argument("index " + std::to_string(idx[i]) + " at position " + std::to_string(i) +
                                " is >= n = " + std::to_string(n));
  throw std::invalid_argument("indices must be strictly ascending: position " + std::to_string(i) + " holds " +
                              std::to_string(idx[i]) + " after " + std::to_string(idx[i - 1]));
}

std::vector<std::uint8_t> encode_indices(const std::uint32_t* idx, std::size_t k, std::uint64_t n) {
  const std::vector<std::uint32_t> gaps = index_gaps(idx, k, n);
  std::vector<std::uint8_t> out;
  put_varint(out, k);
  if (k == 0) return out;
  // Geometric optimum (Gallager & van Voorhis) for the observed mean gap, then
  // the coded size of a few neighbours on a sample of the gaps: real top-k
  // indices cluster, so the best m can sit below the geometric one.
  const double mean_gap = static_cast<double>(n - k) / static_cast<double>(k);
  const double theta = mean_gap / (mean_gap + 1.0);
  std::uint64_t m0 = 1;
  if (theta > 0.0 && theta < 1.0)
    m0 = static_cast<std::uint64_t>(std::max(1.0, std::ceil(std::log(1.0 + theta) / -std::log(theta))));
  m0 = std::min<std::uint64_t>(m0, std::max<std::uint64_t>(1, n));
  const std::size_t stride = std::max<std::size_t>(1, k / 32768);
  auto sampled_bits = [&](std::uint64_t m) {
    const Golomb g(m);
    const DivideBy d(m);
    std::uint64_t bits = 0, q, r;
    for (std::size_t i = 0; i < k; i += stride) {
      d.divmod(gaps[i], q, r);
      bits += q + 1 + g.remainder_bits(r);
    }
    return bits;
  };
  std::uint64_t best_m = m0, best_bits = sampled_bits(m0);
  for (double f : {0.5, 0.7, 0.85, 1.2}) {
    const std::uint64_t m =
        std::max<std::uint64_t>(1, static_cast<std::uint64_t>(std::llround(static_cast<double>(m0) * f)));
    if (m == best_m) continue;
    const std::uint64_t bits = sampled_bits(m);
    if (bits < best_bits) {
      best_bits = bits;
      best_m = m;
    }
  }
  put_varint(out, best_m);
  const std::size_t header = out.size();
  const Golomb g(best_m);
  // Upper bound on the code size: the quotients sum to at most (sum of gaps) / m
  // <= n / m, and each index adds a terminator and at most b remainder bits.
  const std::uint64_t bound_bits = n / best_m + std::uint64_t{k} * (1 + g.b) + 64;
  out.resize(header + static_cast<std::size_t>(bound_bits / 8) + 16, 0);
  BitWriter w(out.data() + header);
  const DivideBy d(best_m);
  for (std::size_t i = 0; i < k; ++i) {
    std::uint64_t q, r;
    d.divmod(gaps[i], q, r);
    if (q + 1 + g.b <= 32) {
      // The whole code in one write: q zero bits, the terminating one, the remainder
      // in truncated binary (its top b-1 bits, then for the wide values its low bit).
      std::uint64_t code = std::uint64_t{1} << q;
      unsigned bits = static_cast<unsigned>(q) + 1;
      if (g.b > 0) {
        const bool wide = r >= g.u;
        const std::uint64_t v = wide ? r + g.u : r << 1;  // narrow: r's b-1 bits, shifted as the wide
        code |= (v >> 1) << bits;
        code |= (v & 1) << (bits + g.b - 1);
        bits += g.b - 1 + (wide ? 1 : 0);
      }
      w.put(code, bits);
      continue;
    }
    w.put_zeros(q);
    w.put(1, 1);
    if (g.b == 0) continue;
    if (r < g.u) {
      w.put(r, g.b - 1);
    } else {
      const std::uint64_t v = r + g.u;
      w.put(v >> 1, g.b - 1);
      w.put(v & 1, 1);
    }
  }
  const std::uint64_t used_bits = w.bits();
  w.flush();
  out.resize(header + static_cast<std::size_t>((used_bits + 7) / 8));
  return out;
}

std::vector<std::uint32_t> decode_indices(const std::uint8_t* data, std::size_t size, std::uint64_t n,
                                          std::uint64_t max_count) {
  GolombDecoder d(data, size, n, max_count);
  std::vector<std::uint32_t> out(static_cast<std::size_t>(d.count()));
  d.start(out.data());
  d.run();
  return out;
}

void decode_indices_into(const std::uint8_t* data, std::size_t size, std::uint64_t n, std::uint32_t* out,
                         std::size_t count) {
  GolombDecoder d(data, size, n, count);
  if (d.count() != count)
    throw MalformedData("index stream holds " + std::to_string(d.count()) + " indices, expected " +
                        std::to_string(count));
  d.start(out);
  d.run();
}

}  // namespace fedpress
