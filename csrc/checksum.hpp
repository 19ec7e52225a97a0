// CRC-32C (Castagnoli), the checksum of the payload format: the same
// polynomial as iSCSI/ext4, hardware-accelerated on x86 with SSE4.2.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

namespace fedpress {

// Continues a CRC: crc32c(b, crc32c(a)) == crc32c(a + b). Start with 0.
std::uint32_t crc32c(const std::uint8_t* data, std::size_t size, std::uint32_t crc = 0);

// CRC-32C of a buffer checksummed in parts, each where it was written (zlib's
// crc32_combine): crc32c_combine(crc32c(a), crc32c(b), crc32c_shift(size of b)) ==
// crc32c(a + b). The shift, which costs a microsecond, can be made apart (in parallel).
std::uint32_t crc32c_shift(std::size_t size_b);
std::uint32_t crc32c_combine(std::uint32_t crc_a, std::uint32_t crc_b, std::uint32_t shift_b);

// Work on a byte range of a buffer being checksummed, cut into units (a value's bytes):
// run(first, last) handles the units [first, last) of the range. The checksum visits the
// buffer in pieces, and right after checksumming a piece runs each job on the units that
// start in it, while the piece is in cache: a decoder that must checksum a payload and
// convert its sections reads the payload once instead of twice.
struct ChecksumJob {
  std::size_t offset = 0, units = 0, unit = 1;
  std::function<void(std::size_t first, std::size_t last)> run;
  bool writes = false;  // it writes an output (the buffer is then visited from its end)
};

// crc32c(data, size, crc), running the jobs on the way (pieces of up to 1 MiB, in parallel
// unless `parallel` is false: a caller checking many buffers runs one per thread).
std::uint32_t crc32c_with_jobs(const std::uint8_t* data, std::size_t size, const std::vector<ChecksumJob>& jobs,
                               std::uint32_t crc = 0, bool parallel = true);

}  // namespace fedpress
