// The part of CUDA that dualnet's kernels use, emulated on the CPU, so that a .cu source can be
// #included unchanged after this header and run by a host compiler (g++ or clang++, C++17).
//
// Execution model.  A launch runs the blocks of the grid one after another, and the warps of a
// block one after another; the 32 lanes of a warp are 32 fibers on one OS thread.
// Each lane runs until it reaches a warp shuffle or returns from the kernel, then hands over to
// the next lane.
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
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <type_traits>
#include <utility>
#if !defined(__x86_64__) || defined(CUDA_EMULATION_UCONTEXT)
#include <ucontext.h>
#endif

struct dim3 {
    unsigned x, y, z;
};

// One translation unit per library: internal linkage keeps each library's state its own.
static dim3 threadIdx{0, 0, 0};
static dim3 blockIdx{0, 0, 0};
static dim3 blockDim{1, 1, 1};
static dim3 gridDim{1, 1, 1};

#define __global__
#define __device__
#define __forceinline__ inline

using std::exp;
using std::log;
using std::sqrt;
static_assert(std::is_same<decltype(sqrt(1.0f)), float>::value, "sqrt(float) must stay in float, as in CUDA");

namespace {
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

void lane_main();

// Fibers.  On x86-64, a switch saves the callee-saved registers on the current stack and swaps
// stack pointers (no system call, unlike swapcontext, which also saves the signal mask: that
// made the emulation ~10 times slower).  Elsewhere, or with -DCUDA_EMULATION_UCONTEXT, ucontext.
#if defined(__x86_64__) && !defined(CUDA_EMULATION_UCONTEXT)
extern "C" void cuda_emulation_switch(void** save_stack, void* load_stack);
asm(R"(
    .text
    .p2align 4
    .type cuda_emulation_switch, @function
cuda_emulation_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuda_emulation_switch, .-cuda_emulation_switch
)");

struct Context {
    void* stack_pointer = nullptr;
};

inline void start(Context& context, unsigned char* stack) {
    // The first switch pops six registers, then "returns" into lane_main, which sees a 16-byte
    // aligned stack minus the return address it never uses (it ends by switching away).
    auto top = reinterpret_cast<std::uintptr_t>(stack + kStackBytes) & ~std::uintptr_t(15);
    void** frame = reinterpret_cast<void**>(top) - 8;
    for (int i = 0; i < 6; ++i) frame[i] = nullptr;
    frame[6] = reinterpret_cast<void*>(&lane_main);
    frame[7] = nullptr;
    context.stack_pointer = frame;
}

inline void switch_to(Context& from, Context& to) { cuda_emulation_switch(&from.stack_pointer, to.stack_pointer); }
#else
struct Context {
    ucontext_t context;
};

inline void start(Context& context, unsigned char* stack) {
    getcontext(&context.context);
    context.context.uc_stack.ss_sp = stack;
    context.context.uc_stack.ss_size = kStackBytes;
    context.context.uc_link = nullptr;
    makecontext(&context.context, lane_main, 0);
}

inline void switch_to(Context& from, Context& to) { swapcontext(&from.context, &to.context); }
#endif

struct Warp {
    Context scheduler;
    Context lanes[kWarpSize];
    LaneState state[kWarpSize];
    ShuffleCall call[kWarpSize];
    alignas(8) unsigned char sent[kWarpSize][8];
    alignas(8) unsigned char received[kWarpSize][8];
    int current = 0;
    unsigned first_thread = 0;
    std::function<void()> body;
    unsigned char* stacks = new unsigned char[kStackBytes * kWarpSize];  // kept for the library's life
};

Warp warp;
char error_text[512];

// Called by a lane that has stopped (at a shuffle, or returned): runs the next lane that is still
// running, or, when none is left, the scheduler.  Lanes hand over directly, one switch each.
void pass_on(int lane) {
    for (int next = lane + 1; next < kWarpSize; ++next) {
        if (warp.state[next] == LaneState::running) {
            threadIdx.x = warp.first_thread + next;
            warp.current = next;
            switch_to(warp.lanes[lane], warp.lanes[next]);
            return;
        }
    }
    switch_to(warp.lanes[lane], warp.scheduler);
}

void lane_main() {
    const int lane = warp.current;
    warp.body();
    warp.state[lane] = LaneState::returned;
    pass_on(lane);  // never resumed
}

// Called by a lane: publish the value, wait for the whole warp, return the source lane's value.
template <typename T>
T shuffle(Shuffle kind, unsigned mask, T value, int delta, int width) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move up to 8 bytes");
    const int lane = warp.current;
    std::memcpy(warp.sent[lane], &value, sizeof(T));
    warp.call[lane] = ShuffleCall{kind, mask, delta, width, static_cast<int>(sizeof(T))};
    warp.state[lane] = LaneState::at_shuffle;
    pass_on(lane);
    T result;
    std::memcpy(&result, warp.received[lane], sizeof(T));
    return result;
}

int source_lane(const ShuffleCall& call, int lane) {
    const int base = lane & ~(call.width - 1);
    const int target = call.kind == Shuffle::xor_lane ? (lane ^ call.delta) : lane + call.delta;
    return (target < base || target >= base + call.width) ? lane : target;
}

// Runs one warp (threads first_thread .. first_thread + 31 of the current block) to completion.
bool run_warp(unsigned first_thread) {
    warp.first_thread = first_thread;
    for (int lane = 0; lane < kWarpSize; ++lane) {
        start(warp.lanes[lane], warp.stacks + kStackBytes * lane);
        warp.state[lane] = LaneState::running;
    }
    for (;;) {
        threadIdx.x = first_thread;  // every lane is running: lane 0 starts, each hands on to the next
        warp.current = 0;
        switch_to(warp.scheduler, warp.lanes[0]);
        int waiting = 0;
        for (int lane = 0; lane < kWarpSize; ++lane) waiting += warp.state[lane] == LaneState::at_shuffle;
        if (waiting == 0) return true;
        if (waiting != kWarpSize) {
            std::snprintf(error_text, sizeof error_text,
                          "divergent warp: %d of 32 lanes wait at a full-mask shuffle, the others returned "
                          "(block %u, threads %u..%u)", waiting, blockIdx.x, first_thread, first_thread + 31);
            return false;
        }
        const ShuffleCall call = warp.call[0];
        for (int lane = 1; lane < kWarpSize; ++lane) {
            if (!(warp.call[lane] == call)) {
                std::snprintf(error_text, sizeof error_text,
                              "lanes 0 and %d of a warp make different shuffles (block %u)", lane, blockIdx.x);
                return false;
            }
        }
        if (call.mask != 0xffffffffu || call.width <= 0 || call.width > kWarpSize ||
            (call.width & (call.width - 1)) != 0) {
            std::snprintf(error_text, sizeof error_text, "unsupported shuffle: mask %#x, width %d", call.mask,
                          call.width);
            return false;
        }
        for (int lane = 0; lane < kWarpSize; ++lane) {
            std::memcpy(warp.received[lane], warp.sent[source_lane(call, lane)], 8);
            warp.state[lane] = LaneState::running;
        }
    }
}

template <typename... Params, std::size_t... Index>
int launch(void (*kernel)(Params...), unsigned grid, unsigned block, void** params,
           std::index_sequence<Index...>) {
    error_text[0] = '\0';
    if (grid == 0 || block == 0 || block % kWarpSize != 0 || block > 1024) {
        std::snprintf(error_text, sizeof error_text, "invalid launch geometry: grid %u, block %u (block must be "
                      "a multiple of 32, at most 1024)", grid, block);
        return 1;
    }
    warp.body = [kernel, params] { kernel(*static_cast<std::remove_reference_t<Params>*>(params[Index])...); };
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
}  // namespace

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
    return cuda_emulation::shuffle(cuda_emulation::Shuffle::xor_lane, mask, value, lane_mask, width);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
    return cuda_emulation::shuffle(cuda_emulation::Shuffle::down, mask, value, static_cast<int>(delta), width);
}

extern "C" const char* cuda_emulation_error() { return cuda_emulation::error_text; }

#define CUDA_EMULATION_EXPORT(kernel)                                                          \
    extern "C" int emulate_##kernel(unsigned grid, unsigned block, void** params) {           \
        return cuda_emulation::launch(kernel, grid, block, params);                           \
    }
