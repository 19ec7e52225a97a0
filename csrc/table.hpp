// The tensor table of a payload (docs/format.md, "Tensor table"), read field by field
// without interpreting it: the reader in fedpress.format checks what the fields mean.
// A fast path for a model of many tensors, where reading thousands of varints one at a
// time in Python cost more than the kernels; a table it cannot read returns false, and
// the Python reader reads that one, reporting exactly what is wrong.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace fedpress {

struct TableEntry {
  std::size_t name_offset = 0, name_length = 0;  // inline tables: the name's bytes in the buffer
  int dtype = 0;                                 // inline tables: the dtype code
  std::vector<std::uint64_t> shape;              // inline tables
  int kind = 0, value_code = 0, flags = 0;
  std::uint64_t count = 0, bucket = 0, block = 0, index_length = 0, value_length = 0;
};

// Reads `n` entries from data[pos, size), with their heads (name, dtype, shape) when
// `heads`, at most `max_dims` dimensions each; on success sets `end` to the offset past
// the last entry. Returns false, with `out` unspecified, at anything it cannot read as
// written by the format: a varint that is truncated, not minimal, longer than 10 bytes
// or beyond 2^64, a field past the end, or too many dimensions.
bool read_table(const std::uint8_t* data, std::size_t size, std::size_t pos, std::size_t n, bool heads,
                std::size_t max_dims, std::vector<TableEntry>& out, std::size_t& end);

// One entry's fields after its head, as the writer writes them: three code bytes, then the
// count, bucket, rotation block, index section length and values section length as varints.
struct EntryFields {
  std::uint8_t kind = 0, value_code = 0, flags = 0;
  std::uint64_t count = 0, bucket = 0, block = 0, index_length = 0, value_length = 0;
};

// Appends `head` (an inline entry's name, dtype and shape, already coded; empty for a
// compact one) and the fields of one entry to `out`.
void write_entry(std::vector<std::uint8_t>& out, const std::uint8_t* head, std::size_t head_size, const EntryFields& e);

}  // namespace fedpress
