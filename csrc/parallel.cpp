#include "parallel.hpp"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

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

namespace {

// One parallel_for call: its tasks, cut into one contiguous run per thread. Each thread
// runs a run front to back, then helps with the others from their back ends: tasks usually
// write consecutive slices of one output, and two threads writing into one fresh huge page
// both take its page fault and the kernel zeroes the 2 MiB page twice (one copy is thrown
// away), which doubled the cost of decoding into a new array. A helper taking from the back
// meets the owner once, in one page, instead of alternating tasks with it.
//
// Workers of the pool may pick a job up late, even after its caller returned: everything
// they touch lives here, held by a shared_ptr. The task itself is only called after a
// successful claim, and the caller returns only once every task is finished or abandoned,
// so no claim can succeed after that.
struct Job {
  struct alignas(64) Run {
    std::atomic<std::uint64_t> span{0};  // front << 32 | back: tasks [front, back) are left
  };
  const std::function<void(std::size_t)>* task;
  std::size_t n_tasks, n_runs;
  std::unique_ptr<Run[]> runs;
  std::atomic<std::size_t> next_run{1};  // the run a joining worker takes as its own (0: the caller's)
  std::atomic<std::size_t> finished{0};  // tasks run or abandoned
  std::mutex mutex;                      // guards error, and the caller's wait
  std::condition_variable all_finished;
  std::exception_ptr error;

  Job(const std::function<void(std::size_t)>& t, std::size_t n, std::size_t runs_count)
      : task(&t), n_tasks(n), n_runs(runs_count), runs(new Run[runs_count]) {
    for (std::size_t w = 0; w < n_runs; ++w) {
      const std::uint64_t front = n_tasks * w / n_runs, back = n_tasks * (w + 1) / n_runs;
      runs[w].span.store(front << 32 | back, std::memory_order_relaxed);
    }
  }

  // Claims a task of run `run` from its front (or back): false when none is left.
  bool claim(std::size_t run, bool from_front, std::size_t& index) {
    std::uint64_t span = runs[run].span.load(std::memory_order_relaxed);
    for (;;) {
      const std::uint64_t front = span >> 32, back = span & 0xFFFFFFFFu;
      if (front >= back) return false;
      const std::uint64_t next = from_front ? (front + 1) << 32 | back : front << 32 | (back - 1);
      if (runs[run].span.compare_exchange_weak(span, next, std::memory_order_acq_rel)) {
        index = static_cast<std::size_t>(from_front ? front : back - 1);
        return true;
      }
    }
  }

  void add_finished(std::size_t count) {
    if (count == 0) return;
    if (finished.fetch_add(count, std::memory_order_acq_rel) + count == n_tasks) {
      std::lock_guard<std::mutex> lock(mutex);  // the caller may be between its check and its wait
      all_finished.notify_all();
    }
  }

  // Runs tasks, starting with run `own`, until none is left to claim.
  void work(std::size_t own) {
    for (std::size_t r = 0; r < n_runs; ++r) {
      const std::size_t run = (own + r) % n_runs;
      std::size_t i;
      while (claim(run, r == 0, i)) {
        try {
          (*task)(i);
        } catch (...) {
          {
            std::lock_guard<std::mutex> lock(mutex);
            if (!error) error = std::current_exception();
          }
          std::size_t abandoned = 0;  // stop handing out work
          for (std::size_t w = 0; w < n_runs; ++w) {
            const std::uint64_t left = runs[w].span.exchange(0, std::memory_order_acq_rel);
            if ((left >> 32) < (left & 0xFFFFFFFFu)) abandoned += (left & 0xFFFFFFFFu) - (left >> 32);
          }
          add_finished(abandoned + 1);
          return;
        }
        add_finished(1);
      }
    }
  }

  bool has_unclaimed_run() const { return next_run.load(std::memory_order_relaxed) < n_runs; }
};

// Worker threads started once and kept: starting threads on every call cost tens of
// microseconds per kernel call (most of the time of a small tensor's), and on a busy
// machine the caller waited a scheduler time slice for a thread that had nothing left
// to do. The caller always works too, so a job finishes even when no worker wakes up.
class Pool {
 public:
  static Pool& instance() {
    static Pool* pool = new Pool();  // never destroyed: detached workers may still wait on it at exit
    return *pool;
  }

  void run(const std::shared_ptr<Job>& job, std::size_t helpers) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (workers_ < helpers) {
        try {
          std::thread(&Pool::serve, this).detach();
        } catch (const std::system_error&) {
          break;  // no more threads to be had (a process limit): the caller and the others do the work
        }
        ++workers_;
      }
      jobs_.push_back(job);
    }
    wake_.notify_all();
    job->work(0);
    {
      std::unique_lock<std::mutex> lock(job->mutex);
      job->all_finished.wait(lock, [&] { return job->finished.load(std::memory_order_acquire) == job->n_tasks; });
    }
    std::lock_guard<std::mutex> lock(mutex_);
    jobs_.erase(std::remove(jobs_.begin(), jobs_.end(), job), jobs_.end());
  }

#if defined(__unix__) || defined(__APPLE__)
  // A forked child has none of the parent's threads: it starts with an empty pool (its
  // callers work alone until it starts its own workers). The pool's lock is held across
  // fork so that the child's copy is in a known state.
  void before_fork() { mutex_.lock(); }
  void after_fork_parent() { mutex_.unlock(); }
  void after_fork_child() {
    new (&mutex_) std::mutex();
    new (&wake_) std::condition_variable();
    workers_ = 0;
    jobs_.clear();
  }
#endif

 private:
  Pool() {
#if defined(__unix__) || defined(__APPLE__)
    pthread_atfork([] { instance().before_fork(); }, [] { instance().after_fork_parent(); },
                   [] { instance().after_fork_child(); });
#endif
  }

  void serve() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      std::shared_ptr<Job> job;
      wake_.wait(lock, [&] {
        for (const auto& j : jobs_)
          if (j->has_unclaimed_run()) {
            job = j;
            return true;
          }
        return false;
      });
      const std::size_t own = job->next_run.fetch_add(1, std::memory_order_relaxed);
      if (own >= job->n_runs) continue;  // another worker took the last run
      lock.unlock();
      job->work(own);
      job.reset();
      lock.lock();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::size_t workers_ = 0;
  std::vector<std::shared_ptr<Job>> jobs_;
};

}  // namespace

namespace {
thread_local bool serial_here = false;
}  // namespace

SerialScope::SerialScope() : previous_(serial_here) { serial_here = true; }
SerialScope::~SerialScope() { serial_here = previous_; }

void parallel_for(std::size_t n_tasks, const std::function<void(std::size_t)>& task) {
  const std::size_t n_workers = std::min<std::size_t>(static_cast<std::size_t>(num_threads()), n_tasks);
  if (n_workers <= 1 || serial_here) {
    for (std::size_t i = 0; i < n_tasks; ++i) task(i);
    return;
  }
  if (n_tasks > 0xFFFFFFFFu) throw std::length_error("parallel_for: more than 2^32 - 1 tasks");
  const auto job = std::make_shared<Job>(task, n_tasks, n_workers);
  Pool::instance().run(job, n_workers - 1);
  if (job->error) std::rethrow_exception(job->error);
}

void parallel_for_sized(std::size_t n_tasks, std::size_t total_elements, const std::function<void(std::size_t)>& task) {
  if (total_elements < kParallelThreshold) {
    for (std::size_t i = 0; i < n_tasks; ++i) task(i);
    return;
  }
  parallel_for(n_tasks, task);
}

}  // namespace fedpress
