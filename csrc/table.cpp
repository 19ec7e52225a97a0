#include "table.hpp"

#include "varint.hpp"

namespace fedpress {
namespace {

// A LEB128 varint as the format writes it: at most 10 bytes, minimal, below 2^64.
bool varint(const std::uint8_t* data, std::size_t size, std::size_t& pos, std::uint64_t& value) {
  value = 0;
  const std::size_t start = pos;
  for (unsigned shift = 0; shift < 70; shift += 7) {
    if (pos >= size) return false;
    const std::uint8_t byte = data[pos++];
    const std::uint64_t bits = byte & 0x7Fu;
    if (shift == 63 && bits > 1) return false;  // beyond 2^64
    value |= bits << shift;
    if (!(byte & 0x80u)) return !(byte == 0 && pos - start > 1);  // a trailing zero byte: not minimal
  }
  return false;  // longer than 10 bytes
}

bool byte(const std::uint8_t* data, std::size_t size, std::size_t& pos, int& value) {
  if (pos >= size) return false;
  value = data[pos++];
  return true;
}

}  // namespace

bool read_table(const std::uint8_t* data, std::size_t size, std::size_t pos, std::size_t n, bool heads,
                std::size_t max_dims, std::vector<TableEntry>& out, std::size_t& end) {
  out.assign(n, TableEntry{});
  for (TableEntry& e : out) {
    if (heads) {
      std::uint64_t name_length;
      if (!varint(data, size, pos, name_length) || name_length > size - pos) return false;
      e.name_offset = pos;
      e.name_length = static_cast<std::size_t>(name_length);
      pos += e.name_length;
      int ndim;
      if (!byte(data, size, pos, e.dtype) || !byte(data, size, pos, ndim)) return false;
      if (static_cast<std::size_t>(ndim) > max_dims) return false;
      e.shape.resize(static_cast<std::size_t>(ndim));
      for (std::uint64_t& d : e.shape)
        if (!varint(data, size, pos, d)) return false;
    }
    if (!byte(data, size, pos, e.kind) || !byte(data, size, pos, e.value_code) || !byte(data, size, pos, e.flags))
      return false;
    for (std::uint64_t* field : {&e.count, &e.bucket, &e.block, &e.index_length, &e.value_length})
      if (!varint(data, size, pos, *field)) return false;
  }
  end = pos;
  return true;
}

void write_entry(std::vector<std::uint8_t>& out, const std::uint8_t* head, std::size_t head_size,
                 const EntryFields& e) {
  out.insert(out.end(), head, head + head_size);
  out.push_back(e.kind);
  out.push_back(e.value_code);
  out.push_back(e.flags);
  for (const std::uint64_t v : {e.count, e.bucket, e.block, e.index_length, e.value_length}) put_varint(out, v);
}

}  // namespace fedpress
