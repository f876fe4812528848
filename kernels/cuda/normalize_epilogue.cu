// The epilogue after the grouped GEMMs (cuBLAS via cupy.matmul), value and K tangents in one pass:
//   out = LN(value + bias)                      LN over the last axis of each (row, group)
//   out_tangent_k = J (tangent_k + bias_tangent_k)
// with J v = (v - mean v - y mean(y v)) / sigma.  It also moves the GEMM layout [G, M, c] to the
// layer's layout [M, G, c].  Layouts (C order):
//   value [G, M, c]   tangent [G, K, M, c]   bias [G, c]   bias_tangent [K, G, c]
//   out [M, G, c]     out_tangent [K, M, G, c]   sigma [M, G]
// normalize_relu goes on through a hidden layer's activation in the same pass:
//   activated = relu(out + residual)
//   activated_tangent_k = (out_tangent_k + injected_k + residual_tangent_k) * [out + residual > 0]
// with injected [K, M, G, c] (a tangent added after the norm), residual [M, G, c] and
// residual_tangent [K, M, G, c]; it writes activated [M, G, c] and the activation's tangent in
// place of out_tangent.
// Absent inputs are flagged by has_* = 0 (their pointers are never read).  One warp per (row,
// group), grid stride over warps.  Self-contained: compiled by CuPy's NVRTC and by nvcc alike.

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        value += __shfl_xor_sync(0xffffffffu, value, offset);
    }
    return value;
}

template <typename T>
__device__ void normalize_epilogue_rows(
    const T* value, const T* tangent, const T* bias, const T* bias_tangent, long long groups, long long rows,
    long long width, long long directions, int has_tangent, int has_bias, int has_bias_tangent, T eps, T* out,
    T* out_tangent, T* sigma, const T* injected, const T* residual, const T* residual_tangent, int has_injected,
    int has_residual, int has_residual_tangent, int relu, T* activated) {
    const int lane = threadIdx.x % 32;
    const long long first = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x / 32;
    for (long long flat = first; flat < rows * groups; flat += stride) {
        const long long m = flat / groups;
        const long long g = flat - m * groups;
        const T* v_row = value + (g * rows + m) * width;
        const T* b_row = bias + g * width;
        const T* residual_row = has_residual ? residual + flat * width : residual;
        T sum = 0;
        for (long long j = lane; j < width; j += 32) sum += v_row[j] + (has_bias ? b_row[j] : T(0));
        const T mean = warp_sum(sum) / width;
        T squares = 0;
        for (long long j = lane; j < width; j += 32) {
            const T centred = v_row[j] + (has_bias ? b_row[j] : T(0)) - mean;
            squares += centred * centred;
        }
        const T std = sqrt(warp_sum(squares) / width + eps);
        if (lane == 0) sigma[flat] = std;
        const bool has_linear = has_tangent || has_bias_tangent;
        for (long long k = 0; k < directions; ++k) {
            const T* t_row = tangent + ((g * directions + k) * rows + m) * width;
            const T* bt_row = bias_tangent + (k * groups + g) * width;
            T t_mean = 0, projection = 0;
            if (has_linear) {
                T t_sum = 0, t_projection = 0;
                for (long long j = lane; j < width; j += 32) {
                    const T t = (has_tangent ? t_row[j] : T(0)) + (has_bias_tangent ? bt_row[j] : T(0));
                    t_sum += t;
                    t_projection += t * (v_row[j] + (has_bias ? b_row[j] : T(0)) - mean);
                }
                t_mean = warp_sum(t_sum) / width;
                projection = warp_sum(t_projection) / (width * std);
            }
            T* out_row = out_tangent + (k * rows * groups + flat) * width;
            const T* shift_row = has_injected ? injected + (k * rows * groups + flat) * width : injected;
            const T* residual_shift_row =
                has_residual_tangent ? residual_tangent + (k * rows * groups + flat) * width : residual_tangent;
            for (long long j = lane; j < width; j += 32) {
                const T y = (v_row[j] + (has_bias ? b_row[j] : T(0)) - mean) / std;
                T t = 0;
                if (has_linear) {
                    const T linear = (has_tangent ? t_row[j] : T(0)) + (has_bias_tangent ? bt_row[j] : T(0));
                    t = (linear - t_mean - y * projection) / std;
                }
                if (relu) {
                    const T pre = y + (has_residual ? residual_row[j] : T(0));
                    t = t + (has_injected ? shift_row[j] : T(0))
                        + (has_residual_tangent ? residual_shift_row[j] : T(0));
                    if (!(pre > T(0))) t = t * T(0);  // as tangent * [pre > 0]: NaN stays NaN
                }
                out_row[j] = t;
            }
        }
        T* out_row = out + flat * width;
        T* activated_row = relu ? activated + flat * width : activated;
        for (long long j = lane; j < width; j += 32) {
            const T y = (v_row[j] + (has_bias ? b_row[j] : T(0)) - mean) / std;
            out_row[j] = y;
            if (relu) {
                const T pre = y + (has_residual ? residual_row[j] : T(0));
                activated_row[j] = pre <= T(0) ? T(0) : pre;  // NaN stays NaN, as in relu
            }
        }
    }
}

#define DUALNET_EPILOGUE_KERNEL(T, SUFFIX)                                                                 \
    extern "C" __global__ void normalize_epilogue_##SUFFIX(                                               \
        const T* value, const T* tangent, const T* bias, const T* bias_tangent, long long groups,         \
        long long rows, long long width, long long directions, int has_tangent, int has_bias,             \
        int has_bias_tangent, T eps, T* out, T* out_tangent, T* sigma) {                                  \
        normalize_epilogue_rows<T>(value, tangent, bias, bias_tangent, groups, rows, width, directions,   \
                                   has_tangent, has_bias, has_bias_tangent, eps, out, out_tangent, sigma, \
                                   nullptr, nullptr, nullptr, 0, 0, 0, 0, nullptr);                       \
    }                                                                                                      \
    extern "C" __global__ void normalize_relu_##SUFFIX(                                                   \
        const T* value, const T* tangent, const T* bias, const T* bias_tangent, const T* injected,        \
        const T* residual, const T* residual_tangent, long long groups, long long rows, long long width,  \
        long long directions, int has_tangent, int has_bias, int has_bias_tangent, int has_injected,      \
        int has_residual, int has_residual_tangent, T eps, T* normalized, T* activated,                   \
        T* activated_tangent, T* sigma) {                                                                  \
        normalize_epilogue_rows<T>(value, tangent, bias, bias_tangent, groups, rows, width, directions,   \
                                   has_tangent, has_bias, has_bias_tangent, eps, normalized,              \
                                   activated_tangent, sigma, injected, residual, residual_tangent,        \
                                   has_injected, has_residual, has_residual_tangent, 1, activated);       \
    }

DUALNET_EPILOGUE_KERNEL(float, f32)
DUALNET_EPILOGUE_KERNEL(double, f64)
