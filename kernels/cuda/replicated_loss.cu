// CUDA kernels of the fused replicated losses (dualnet.losses.replicated_*), compiled by CuPy
// (NVRTC: no host headers).  Each is held to its NumPy reference in dualnet/losses.py.
//
// replica_tangent_{f32,f64}: d[k,n,p,g] = scale * sum_c xt[k,n,p,g,c] * u[n,g,c] + head[k',n]
//   One warp per output row (k,n,p,g), grid stride over warps (any grid size is correct): lanes
//   read consecutive channels (coalesced), then a shuffle reduction.  head_directions: 0 = no
//   head term, 1 = head[0,n] for every k, K = head[k,n].
//   accumulate != 0 adds into out instead of overwriting it.  All arrays C-contiguous.
//
// replica_cotangent_{f32,f64}: out[n,p,g,c] = scale * cot[n,p,g] * u[n,g,c]
//   One thread per output element, grid stride over threads.

template <typename T>
__device__ __forceinline__ void replica_tangent(
        const T* __restrict__ x_tangent, const T* __restrict__ u, const T* __restrict__ head,
        T* __restrict__ out, long long directions, long long examples, long long patches,
        long long groups, long long channels, long long head_directions, T scale, int accumulate) {
    const long long rows = directions * examples * patches * groups;
    const int lane = threadIdx.x % 32;
    const long long first = (blockIdx.x * (long long)blockDim.x + threadIdx.x) / 32;
    const long long stride = (long long)gridDim.x * blockDim.x / 32;
    for (long long row = first; row < rows; row += stride) {  // row is uniform across the warp
        const long long g = row % groups;
        const long long n = (row / (groups * patches)) % examples;
        const long long k = row / (groups * patches * examples);
        const T* x_row = x_tangent + row * channels;
        const T* u_row = u + (n * groups + g) * channels;
        T total = 0;
        for (long long c = lane; c < channels; c += 32) {
            total += x_row[c] * u_row[c];
        }
        for (int offset = 16; offset > 0; offset /= 2) {
            total += __shfl_down_sync(0xffffffffu, total, offset);
        }
        if (lane == 0) {
            T value = scale * total;
            if (head_directions > 0) {
                value += head[(head_directions > 1 ? k : 0) * examples + n];
            }
            out[row] = accumulate ? out[row] + value : value;
        }
    }
}

template <typename T>
__device__ __forceinline__ void replica_cotangent(
        const T* __restrict__ cotangent, const T* __restrict__ u, T* __restrict__ out,
        long long examples, long long patches, long long groups, long long channels, T scale) {
    const long long size = examples * patches * groups * channels;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long index = blockIdx.x * (long long)blockDim.x + threadIdx.x; index < size; index += stride) {
        const long long c = index % channels;
        const long long row = index / channels;  // (n, p, g)
        const long long g = row % groups;
        const long long n = row / (groups * patches);
        out[index] = scale * cotangent[row] * u[(n * groups + g) * channels + c];
    }
}

extern "C" __global__ void replica_tangent_f32(
        const float* x_tangent, const float* u, const float* head, float* out, long long directions,
        long long examples, long long patches, long long groups, long long channels,
        long long head_directions, float scale, int accumulate) {
    replica_tangent<float>(x_tangent, u, head, out, directions, examples, patches, groups, channels,
                           head_directions, scale, accumulate);
}

extern "C" __global__ void replica_tangent_f64(
        const double* x_tangent, const double* u, const double* head, double* out, long long directions,
        long long examples, long long patches, long long groups, long long channels,
        long long head_directions, double scale, int accumulate) {
    replica_tangent<double>(x_tangent, u, head, out, directions, examples, patches, groups, channels,
                            head_directions, scale, accumulate);
}

extern "C" __global__ void replica_cotangent_f32(
        const float* cotangent, const float* u, float* out, long long examples, long long patches,
        long long groups, long long channels, float scale) {
    replica_cotangent<float>(cotangent, u, out, examples, patches, groups, channels, scale);
}

extern "C" __global__ void replica_cotangent_f64(
        const double* cotangent, const double* u, double* out, long long examples, long long patches,
        long long groups, long long channels, double scale) {
    replica_cotangent<double>(cotangent, u, out, examples, patches, groups, channels, scale);
}
