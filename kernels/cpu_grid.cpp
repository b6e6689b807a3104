// The CPU stand-in for a CUDA launch of sha256d_scan: the kernel source itself, compiled as
// C++, run by one OS thread per CUDA thread. A block's threads meet at a real barrier for
// __syncthreads_or, atomicAdd is an atomic read-modify-write, and the `stop` word is read
// while the threads run, so the host protocol (resume points, pre-emption, overflow, wrap)
// runs in CI exactly as it would against a GPU, only slower. Built by build.rs; called from
// src/mining/gpu/cpu_grid.rs.

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

namespace {

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

// What a CUDA thread reads from its built-in variables, set per OS thread before the kernel
// body runs.
thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

// One block's barrier with the OR of its threads' predicates: every thread of the block
// arrives, the last one publishes the OR and opens the next generation.
class BlockBarrier {
  public:
    explicit BlockBarrier(unsigned threads) : threads_(threads) {}

    int sync_or(int predicate) {
        std::unique_lock<std::mutex> lock(m_);
        if (aborted_) return 1;
        const unsigned gen = generation_;
        acc_ |= predicate != 0;
        if (++arrived_ == threads_) {
            result_ = acc_;
            acc_ = 0;
            arrived_ = 0;
            generation_++;
            cv_.notify_all();
            return result_;
        }
        cv_.wait(lock, [&] { return generation_ != gen || aborted_; });
        return aborted_ ? 1 : result_;
    }

    // For a block whose threads could not all be created: every wait ends, and every
    // barrier answers "stop", which the kernel obeys at its first checkpoint.
    void abort() {
        std::lock_guard<std::mutex> lock(m_);
        aborted_ = true;
        cv_.notify_all();
    }

  private:
    std::mutex m_;
    std::condition_variable cv_;
    const unsigned threads_;
    unsigned arrived_ = 0, generation_ = 0;
    int acc_ = 0, result_ = 0;
    bool aborted_ = false;
};

thread_local BlockBarrier* current_block = nullptr;

int __syncthreads_or(int predicate) { return current_block->sync_or(predicate); }

unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }

}  // namespace

#define IDLERIG_CPU_GRID 1
#define __global__
#include "sha256d.cu"

// Runs one launch of grid × block threads to completion. Returns 0, or -1 when the threads
// could not all be created: the blocks are then told to stop, and nothing the launch wrote
// may be trusted.
extern "C" int idlerig_cpu_grid_scan(const Job* job, unsigned grid, unsigned block, unsigned start,
                                     unsigned last, unsigned end_wave, const unsigned* resume,
                                     unsigned every, unsigned* out, unsigned cap,
                                     const volatile unsigned* stop, unsigned* progress) {
    if (grid == 0 || block == 0) return -1;
    std::vector<BlockBarrier*> barriers;
    std::vector<std::thread> threads;
    std::atomic<bool> failed{false};
    int rc = 0;
    // No exception may cross this extern "C" boundary into Rust (that is undefined behaviour):
    // any failure to set the launch up (threads, memory) is -1, as is one inside a thread.
    try {
        for (unsigned b = 0; b < grid; b++) barriers.push_back(new BlockBarrier(block));
        threads.reserve((size_t)grid * block);
        // Every block's threads are all created before any can wait for them: a block whose
        // threads could not all be made would wait at its barrier for ever.
        for (unsigned b = 0; b < grid; b++) {
            for (unsigned t = 0; t < block; t++) {
                BlockBarrier* barrier = barriers[b];
                threads.emplace_back([=, &failed] {
                    gridDim.x = grid;
                    blockDim.x = block;
                    blockIdx.x = b;
                    threadIdx.x = t;
                    current_block = barrier;
                    // An exception leaving a thread's function would end the process.
                    try {
                        sha256d_scan(*job, start, last, end_wave, resume, every, out, cap, stop,
                                     progress);
                    } catch (...) {
                        failed.store(true);
                        barrier->abort();
                    }
                });
            }
        }
    } catch (...) {
        rc = -1;
    }
    if (rc != 0) {
        for (auto* b : barriers) b->abort();
    }
    for (auto& th : threads) th.join();
    for (auto* b : barriers) delete b;
    return failed.load() ? -1 : rc;
}
