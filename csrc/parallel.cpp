#include "parallel.hpp"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <mutex>
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
  std::atomic<std::size_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto worker = [&]() {
    for (;;) {
      const std::size_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n_tasks) return;
      try {
        task(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        next.store(n_tasks, std::memory_order_relaxed);  // stop handing out work
        return;
      }
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(n_workers - 1);
  for (std::size_t t = 1; t < n_workers; ++t) threads.emplace_back(worker);
  worker();
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
