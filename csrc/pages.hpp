// A buffer's memory handed back to the system while the buffer stays allocated: for a
// large buffer whose front has been read for the last time (a payload's body compressed a
// window at a time), so that it and what is made from it are not resident together.
#pragma once

#include <cstddef>

namespace fedpress {

// Drops the whole pages inside [data + begin, data + end) from the process's resident
// memory (Linux: madvise MADV_DONTNEED on private anonymous memory; reading them again
// gives zeros); elsewhere nothing. The buffer must be one nobody reads there again.
void discard_pages(void* data, std::size_t begin, std::size_t end);

}  // namespace fedpress
