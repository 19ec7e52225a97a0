#include "pages.hpp"

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace fedpress {

void discard_pages(void* data, std::size_t begin, std::size_t end) {
#if defined(__linux__)
  static const std::uintptr_t page = static_cast<std::uintptr_t>(sysconf(_SC_PAGESIZE));
  if (end <= begin || page == 0) return;
  const std::uintptr_t base = reinterpret_cast<std::uintptr_t>(data);
  // Whole pages only: the first and last partial pages may hold the allocator's
  // bookkeeping or another object.
  const std::uintptr_t first = (base + begin + page - 1) / page * page, last = (base + end) / page * page;
  if (first < last) madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
#else
  (void)data;
  (void)begin;
  (void)end;
#endif
}

}  // namespace fedpress
