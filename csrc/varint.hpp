// LEB128 varints as the index streams write them (docs/format.md, "Conventions"):
// minimal, at most 10 bytes, no overflow past 64 bits.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "errors.hpp"

namespace fedpress {

inline void put_varint(std::vector<std::uint8_t>& out, std::uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<std::uint8_t>(v | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<std::uint8_t>(v));
}

// Reads the varint at data[pos], advancing pos; throws MalformedData naming `field`.
inline std::uint64_t get_varint(const std::uint8_t* data, std::size_t size, std::size_t& pos, const char* field) {
  std::uint64_t v = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    if (pos >= size)
      throw MalformedData(std::string("index stream truncated in ") + field + ": need a byte at offset " +
                          std::to_string(pos) + ", have " + std::to_string(size));
    const std::uint8_t byte = data[pos++];
    if (shift == 63 && byte > 1)
      throw MalformedData(std::string("index stream: ") + field + " varint overflows 64 bits");
    v |= static_cast<std::uint64_t>(byte & 0x7F) << shift;
    if (!(byte & 0x80)) {
      if (byte == 0 && shift > 0) throw MalformedData(std::string("index stream: ") + field + " varint is not minimal");
      return v;
    }
  }
  throw MalformedData(std::string("index stream: ") + field + " varint longer than 10 bytes");
}

}  // namespace fedpress
