// The part of CUDA that dualnet's kernels use, emulated on the CPU, so that a .cu source can be
// #included unchanged after this header and run by a host compiler (g++ or clang++, C++17).
//
// Execution model.  A launch runs the blocks of the grid one after another, and the warps of a
// block one after another; the 32 lanes of a warp are 32 fibers (ucontext) on one OS thread.
// The scheduler resumes each lane until it reaches a warp shuffle or returns from the kernel.
// When every lane waits at a shuffle, the values are exchanged all at once (lock step: each lane
// reads what its source lane passed to *this* shuffle) and the lanes resume.  A full-mask
// shuffle that some lanes skip (a lane returned, or lanes disagree on the operation, mask,
// offset or width) is reported as a launch error, as it is undefined behaviour on a GPU.
//
// Emulated: threadIdx, blockIdx, blockDim, gridDim (x only: dualnet launches 1-D grids),
// __global__, __device__, __forceinline__, __shfl_xor_sync, __shfl_down_sync, and sqrt / exp /
// log with their float overloads.  Not emulated, because no kernel uses them: shared memory,
// __syncthreads, atomics; a kernel that uses one fails to compile here.  Each source is
// compiled into its own shared library (sources may define the same helper templates).
//
// Entry points for ctypes are made by CUDA_EMULATION_EXPORT(kernel), which defines
//   extern "C" int emulate_<kernel>(unsigned grid, unsigned block, void** params)
// with params[i] pointing at the i-th argument (as cuLaunchKernel takes them); it returns 0, or
// nonzero with the reason in cuda_emulation_error().
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <functional>
#include <type_traits>
#include <ucontext.h>
#include <utility>

struct dim3 {
    unsigned x, y, z;
};

inline dim3 threadIdx{0, 0, 0};
inline dim3 blockIdx{0, 0, 0};
inline dim3 blockDim{1, 1, 1};
inline dim3 gridDim{1, 1, 1};

#define __global__
#define __device__
#define __forceinline__ inline

using std::exp;
using std::log;
using std::sqrt;
static_assert(std::is_same<decltype(sqrt(1.0f)), float>::value, "sqrt(float) must stay in float, as in CUDA");

namespace cuda_emulation {

constexpr int kWarpSize = 32;
constexpr std::size_t kStackBytes = 256 * 1024;

enum class LaneState { running, at_shuffle, returned };
enum class Shuffle { xor_lane, down };

struct ShuffleCall {
    Shuffle kind;
    unsigned mask;
    int delta;
    int width;
    int bytes;
    bool operator==(const ShuffleCall& other) const {
        return kind == other.kind && mask == other.mask && delta == other.delta && width == other.width &&
               bytes == other.bytes;
    }
};

struct Warp {
    ucontext_t scheduler;
    ucontext_t lanes[kWarpSize];
    LaneState state[kWarpSize];
    ShuffleCall call[kWarpSize];
    alignas(8) unsigned char sent[kWarpSize][8];
    alignas(8) unsigned char received[kWarpSize][8];
    int current = 0;
    std::function<void()> body;
};

inline Warp& warp() {
    static Warp* instance = new Warp();  // lives for the process, like the stacks below
    return *instance;
}

inline unsigned char* stack(int lane) {
    static unsigned char* stacks = new unsigned char[kStackBytes * kWarpSize];
    return stacks + kStackBytes * lane;
}

inline char* error_text() {
    static char text[512];
    return text;
}

inline void lane_main() {
    Warp& w = warp();
    const int lane = w.current;
    w.body();
    w.state[lane] = LaneState::returned;  // uc_link resumes the scheduler
}

// Called by a lane: publish the value, wait for the whole warp, return the source lane's value.
template <typename T>
T shuffle(Shuffle kind, unsigned mask, T value, int delta, int width) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move up to 8 bytes");
    Warp& w = warp();
    const int lane = w.current;
    std::memcpy(w.sent[lane], &value, sizeof(T));
    w.call[lane] = ShuffleCall{kind, mask, delta, width, static_cast<int>(sizeof(T))};
    w.state[lane] = LaneState::at_shuffle;
    swapcontext(&w.lanes[lane], &w.scheduler);
    T result;
    std::memcpy(&result, w.received[lane], sizeof(T));
    return result;
}

inline int source_lane(const ShuffleCall& call, int lane) {
    const int base = lane & ~(call.width - 1);
    const int target = call.kind == Shuffle::xor_lane ? (lane ^ call.delta) : lane + call.delta;
    return (target < base || target >= base + call.width) ? lane : target;
}

// Runs one warp (lanes first_thread .. first_thread + 31 of the current block) to completion.
inline bool run_warp(unsigned first_thread) {
    Warp& w = warp();
    for (int lane = 0; lane < kWarpSize; ++lane) {
        getcontext(&w.lanes[lane]);
        w.lanes[lane].uc_stack.ss_sp = stack(lane);
        w.lanes[lane].uc_stack.ss_size = kStackBytes;
        w.lanes[lane].uc_link = &w.scheduler;
        makecontext(&w.lanes[lane], lane_main, 0);
        w.state[lane] = LaneState::running;
    }
    for (;;) {
        for (int lane = 0; lane < kWarpSize; ++lane) {
            if (w.state[lane] != LaneState::running) continue;
            threadIdx.x = first_thread + lane;
            w.current = lane;
            swapcontext(&w.scheduler, &w.lanes[lane]);
        }
        int waiting = 0;
        for (int lane = 0; lane < kWarpSize; ++lane) waiting += w.state[lane] == LaneState::at_shuffle;
        if (waiting == 0) return true;
        if (waiting != kWarpSize) {
            std::snprintf(error_text(), 512,
                          "divergent warp: %d of 32 lanes wait at a full-mask shuffle, the others returned "
                          "(block %u, threads %u..%u)", waiting, blockIdx.x, first_thread, first_thread + 31);
            return false;
        }
        const ShuffleCall call = w.call[0];
        for (int lane = 1; lane < kWarpSize; ++lane) {
            if (!(w.call[lane] == call)) {
                std::snprintf(error_text(), 512, "lanes 0 and %d of a warp make different shuffles (block %u)",
                              lane, blockIdx.x);
                return false;
            }
        }
        if (call.mask != 0xffffffffu || call.width <= 0 || call.width > kWarpSize ||
            (call.width & (call.width - 1)) != 0) {
            std::snprintf(error_text(), 512, "unsupported shuffle: mask %#x, width %d", call.mask, call.width);
            return false;
        }
        for (int lane = 0; lane < kWarpSize; ++lane) {
            std::memcpy(w.received[lane], w.sent[source_lane(call, lane)], 8);
            w.state[lane] = LaneState::running;
        }
    }
}

template <typename... Params, std::size_t... Index>
int launch(void (*kernel)(Params...), unsigned grid, unsigned block, void** params,
           std::index_sequence<Index...>) {
    error_text()[0] = '\0';
    if (grid == 0 || block == 0 || block % kWarpSize != 0 || block > 1024) {
        std::snprintf(error_text(), 512, "invalid launch geometry: grid %u, block %u (block must be a "
                      "multiple of 32, at most 1024)", grid, block);
        return 1;
    }
    Warp& w = warp();
    w.body = [kernel, params] { kernel(*static_cast<std::remove_reference_t<Params>*>(params[Index])...); };
    gridDim = dim3{grid, 1, 1};
    blockDim = dim3{block, 1, 1};
    for (unsigned b = 0; b < grid; ++b) {
        blockIdx = dim3{b, 0, 0};
        for (unsigned first = 0; first < block; first += kWarpSize) {
            if (!run_warp(first)) return 1;
        }
    }
    return 0;
}

template <typename... Params>
int launch(void (*kernel)(Params...), unsigned grid, unsigned block, void** params) {
    return launch(kernel, grid, block, params, std::index_sequence_for<Params...>{});
}

}  // namespace cuda_emulation

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
    return cuda_emulation::shuffle(cuda_emulation::Shuffle::xor_lane, mask, value, lane_mask, width);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
    return cuda_emulation::shuffle(cuda_emulation::Shuffle::down, mask, value, static_cast<int>(delta), width);
}

extern "C" const char* cuda_emulation_error() { return cuda_emulation::error_text(); }

#define CUDA_EMULATION_EXPORT(kernel)                                                          \
    extern "C" int emulate_##kernel(unsigned grid, unsigned block, void** params) {           \
        return cuda_emulation::launch(kernel, grid, block, params);                           \
    }
