#include "parallel.hpp"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

namespace fedpress {
namespace {

int default_threads() {
  if (const char* env = std::getenv("FEDPRESS_NUM_THREADS")) {
    const long v = std::strtol(env, nullptr, 10);
    if (v >= 1 && v <= 1024) return static_cast<int>(v);
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(std::min(hw, 1024u));
}

std::atomic<int>& thread_setting() {
  static std::atomic<int> setting{default_threads()};
  return setting;
}

}  // namespace

int num_threads() { return thread_setting().load(std::memory_order_relaxed); }

void set_num_threads(int n) { thread_setting().store(std::max(1, n), std::memory_order_relaxed); }

void parallel_for(std::size_t n_tasks, const std::function<void(std::size_t)>& task) {
  const std::size_t n_workers = std::min<std::size_t>(static_cast<std::size_t>(num_threads()), n_tasks);
  if (n_workers <= 1) {
    for (std::size_t i = 0; i < n_tasks; ++i) task(i);
    return;
  }
  // Each worker runs a contiguous run of tasks front to back, then helps with the runs of
  // the others from their back ends. Contiguous, because tasks usually write consecutive
  // slices of one output: two threads writing into one fresh huge page both take its page
  // fault and the kernel zeroes the 2 MiB page twice (one copy is thrown away), which
  // doubled the cost of decoding into a new array. A helper takes from the back so that
  // it meets the owner once, in one page, instead of alternating tasks with it.
  struct alignas(64) Run {
    std::atomic<std::uint64_t> span;  // front << 32 | back: tasks [front, back) are left
  };
  if (n_tasks > 0xFFFFFFFFu) throw std::length_error("parallel_for: too many tasks");
  std::unique_ptr<Run[]> runs(new Run[n_workers]);
  for (std::size_t w = 0; w < n_workers; ++w) {
    const std::uint64_t front = n_tasks * w / n_workers, back = n_tasks * (w + 1) / n_workers;
    runs[w].span.store(front << 32 | back, std::memory_order_relaxed);
  }
  // Claims a task of run `run` (from its front, or its back), or returns false when none is left.
  const auto claim = [&](std::size_t run, bool from_front, std::size_t& task_index) {
    std::uint64_t span = runs[run].span.load(std::memory_order_relaxed);
    for (;;) {
      const std::uint64_t front = span >> 32, back = span & 0xFFFFFFFFu;
      if (front >= back) return false;
      const std::uint64_t next = from_front ? (front + 1) << 32 | back : front << 32 | (back - 1);
      if (runs[run].span.compare_exchange_weak(span, next, std::memory_order_relaxed)) {
        task_index = static_cast<std::size_t>(from_front ? front : back - 1);
        return true;
      }
    }
  };
  std::exception_ptr error;
  std::mutex error_mutex;
  auto worker = [&](std::size_t own) {
    for (std::size_t r = 0; r < n_workers; ++r) {
      const std::size_t run = (own + r) % n_workers;
      std::size_t i;
      while (claim(run, r == 0, i)) {
        try {
          task(i);
        } catch (...) {
          std::lock_guard<std::mutex> lock(error_mutex);
          if (!error) error = std::current_exception();
          for (std::size_t w = 0; w < n_workers; ++w) runs[w].span.store(0, std::memory_order_relaxed);  // stop
          return;
        }
      }
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(n_workers - 1);
  for (std::size_t t = 1; t < n_workers; ++t) threads.emplace_back(worker, t);
  worker(0);
  for (auto& th : threads) th.join();
  if (error) std::rethrow_exception(error);
}

void parallel_for_sized(std::size_t n_tasks, std::size_t total_elements,
                        const std::function<void(std::size_t)>& task) {
  if (total_elements < kParallelThreshold) {
    for (std::size_t i = 0; i < n_tasks; ++i) task(i);
    return;
  }
  parallel_for(n_tasks, task);
}

}  // namespace fedpress
