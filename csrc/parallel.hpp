// Thread splitting for the kernels.
//
// Work is always cut into fixed-size tasks whose boundaries depend only on the
// input size, never on the number of threads; each task writes its own slot and
// callers combine the slots in task order. That is what makes every result
// independent of the thread count.
#pragma once

#include <cstddef>
#include <functional>

namespace fedpress {

// Number of worker threads the kernels may use (>= 1). The default is the
// hardware concurrency, or FEDPRESS_NUM_THREADS when that is set.
int num_threads();
void set_num_threads(int n);

// Runs task(i) for every i in [0, n_tasks) on up to num_threads() threads
// (never more threads than tasks). Each thread starts on its own contiguous run of
// tasks and then claims what is left of the others' runs, so a task must not depend
// on which thread runs it. The first exception thrown by a task is
// rethrown on the calling thread after all threads have joined.
void parallel_for(std::size_t n_tasks, const std::function<void(std::size_t)>& task);

// Like parallel_for, but runs serially when the total amount of work (in
// elements) is below the point where starting threads pays off.
void parallel_for_sized(std::size_t n_tasks, std::size_t total_elements, const std::function<void(std::size_t)>& task);

// While one is alive on a thread, parallel_for there runs every task itself: for a caller
// that already spreads its work over the threads (a payload's pieces, one per task), whose
// kernels must not split each piece again.
class SerialScope {
 public:
  SerialScope();
  ~SerialScope();
  SerialScope(const SerialScope&) = delete;
  SerialScope& operator=(const SerialScope&) = delete;

 private:
  bool previous_;
};

// Elements below which kernels stay on the calling thread.
constexpr std::size_t kParallelThreshold = std::size_t{1} << 17;

inline std::size_t ceil_div(std::size_t a, std::size_t b) { return a / b + (a % b != 0); }  // no a + b overflow

}  // namespace fedpress
