// FG-A's gradient at a layer's site (dualnet.rules.base.reference_site_gradient), one thread per
// element of the output [N, A, B] (grid stride):
//   out[n, a, b] = (sum over k of factors[k, n, a] * values[k, n, a, b]) * mask[n, a, b]
// with the directions added in order k = 0, 1, ... and the mask (bool; its pointer never read
// when has_mask is 0) applied last.  Self-contained: compiled by CuPy's NVRTC and by nvcc alike.

template <typename T>
__device__ void site_gradient_items(const T* factors, const T* values, const bool* mask, long long directions,
                                    long long rows, long long blocks, long long width, int has_mask, T* out) {
    const long long items = rows * blocks * width;
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long i = first; i < items; i += stride) {
        const long long block = i / width;  // n * blocks + a
        T total = factors[block] * values[i];
        for (long long k = 1; k < directions; ++k) {
            total = total + factors[k * rows * blocks + block] * values[k * items + i];
        }
        out[i] = has_mask ? total * T(mask[i] ? 1 : 0) : total;
    }
}

extern "C" __global__ void site_gradient_f32(const float* factors, const float* values, const bool* mask,
                                             long long directions, long long rows, long long blocks,
                                             long long width, int has_mask, float* out) {
    site_gradient_items<float>(factors, values, mask, directions, rows, blocks, width, has_mask, out);
}

extern "C" __global__ void site_gradient_f64(const double* factors, const double* values, const bool* mask,
                                             long long directions, long long rows, long long blocks,
                                             long long width, int has_mask, double* out) {
    site_gradient_items<double>(factors, values, mask, directions, rows, blocks, width, has_mask, out);
}
