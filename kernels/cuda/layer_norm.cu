// Local layer norm over the last axis (no affine), value and K tangents in one pass, and the
// product with its symmetric Jacobian (tangents and the pull-back):
//   y = (x - mean x) / sigma,  sigma = sqrt(var x + eps)   (biased variance)
//   J v = (v - mean v - y mean(y v)) / sigma
// One warp per row; the row loop is a grid stride over warps, so any grid size is correct.
// Self-contained (no headers): compiled by CuPy's NVRTC and by nvcc alike.

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        value += __shfl_xor_sync(0xffffffffu, value, offset);
    }
    return value;
}

__device__ __forceinline__ long long first_warp() {
    return (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
}

__device__ __forceinline__ long long warp_stride() {
    return static_cast<long long>(gridDim.x) * blockDim.x / 32;
}

// x [R, c]; tangent [K, R, c]; writes y [R, c], y_tangent [K, R, c], sigma [R].
template <typename T>
__device__ void layer_norm_forward_rows(const T* x, const T* tangent, long long directions, long long rows,
                                        long long width, T eps, T* y, T* y_tangent, T* sigma) {
    const int lane = threadIdx.x % 32;
    for (long long row = first_warp(); row < rows; row += warp_stride()) {
        const T* x_row = x + row * width;
        T sum = 0;
        for (long long j = lane; j < width; j += 32) sum += x_row[j];
        const T mean = warp_sum(sum) / width;
        T squares = 0;
        for (long long j = lane; j < width; j += 32) {
            const T centred = x_row[j] - mean;
            squares += centred * centred;
        }
        const T std = sqrt(warp_sum(squares) / width + eps);
        if (lane == 0) sigma[row] = std;
        T* y_row = y + row * width;
        for (long long j = lane; j < width; j += 32) y_row[j] = (x_row[j] - mean) / std;
        for (long long k = 0; k < directions; ++k) {
            const T* t_row = tangent + (k * rows + row) * width;
            T t_sum = 0, t_projection = 0;
            for (long long j = lane; j < width; j += 32) {
                t_sum += t_row[j];
                t_projection += t_row[j] * (x_row[j] - mean);
            }
            const T t_mean = warp_sum(t_sum) / width;
            const T projection = warp_sum(t_projection) / (width * std);
            T* out_row = y_tangent + (k * rows + row) * width;
            for (long long j = lane; j < width; j += 32) {
                out_row[j] = (t_row[j] - t_mean - (x_row[j] - mean) / std * projection) / std;
            }
        }
    }
}

// normalized [R, c]; sigma [R]; vectors, out [K, R, c]; one warp per (k, row).
template <typename T>
__device__ void layer_norm_jacobian_rows(const T* normalized, const T* sigma, const T* vectors,
                                         long long directions, long long rows, long long width, T* out) {
    const int lane = threadIdx.x % 32;
    for (long long item = first_warp(); item < directions * rows; item += warp_stride()) {
        const long long row = item % rows;
        const T* y_row = normalized + row * width;
        const T* v_row = vectors + item * width;
        T v_sum = 0, v_projection = 0;
        for (long long j = lane; j < width; j += 32) {
            v_sum += v_row[j];
            v_projection += v_row[j] * y_row[j];
        }
        const T v_mean = warp_sum(v_sum) / width;
        const T projection = warp_sum(v_projection) / width;
        T* out_row = out + item * width;
        for (long long j = lane; j < width; j += 32) {
            out_row[j] = (v_row[j] - v_mean - y_row[j] * projection) / sigma[row];
        }
    }
}

#define DUALNET_LAYER_NORM_KERNELS(T, SUFFIX)                                                          \
    extern "C" __global__ void layer_norm_forward_##SUFFIX(                                           \
        const T* x, const T* tangent, long long directions, long long rows, long long width, T eps,   \
        T* y, T* y_tangent, T* sigma) {                                                               \
        layer_norm_forward_rows<T>(x, tangent, directions, rows, width, eps, y, y_tangent, sigma);    \
    }                                                                                                 \
    extern "C" __global__ void layer_norm_jacobian_##SUFFIX(                                          \
        const T* normalized, const T* sigma, const T* vectors, long long directions, long long rows,  \
        long long width, T* out) {                                                                    \
        layer_norm_jacobian_rows<T>(normalized, sigma, vectors, directions, rows, width, out);        \
    }

DUALNET_LAYER_NORM_KERNELS(float, f32)
DUALNET_LAYER_NORM_KERNELS(double, f64)
