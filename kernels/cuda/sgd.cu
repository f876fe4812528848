// The SGD update in place, one thread per element (grid stride), the operations of
// dualnet.optim.reference_sgd_update in the same order:
//   g = grad + weight_decay * param                   (when weight_decay != 0)
//   buffer = buffer * momentum + g                    (when has_buffer)
//   d = nesterov ? g + momentum * buffer : buffer     (g without a buffer)
//   param = param - lr * d
// The compiler may fuse a multiply and an add, so the result equals NumPy's to rounding.
// Without a buffer its pointer is never read.  Self-contained: compiled by CuPy's NVRTC and by
// nvcc alike.

template <typename T>
__device__ void sgd_update_items(T* param, const T* grad, T* buffer, long long size, T lr, T momentum,
                                 T weight_decay, int has_buffer, int nesterov) {
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long i = first; i < size; i += stride) {
        T g = grad[i];
        if (weight_decay != T(0)) g += weight_decay * param[i];
        if (has_buffer) {
            const T b = buffer[i] * momentum + g;
            buffer[i] = b;
            g = nesterov ? g + momentum * b : b;
        }
        param[i] -= lr * g;
    }
}

extern "C" __global__ void sgd_update_f32(float* param, const float* grad, float* buffer, long long size, float lr,
                                          float momentum, float weight_decay, int has_buffer, int nesterov) {
    sgd_update_items<float>(param, grad, buffer, size, lr, momentum, weight_decay, has_buffer, nesterov);
}

extern "C" __global__ void sgd_update_f64(double* param, const double* grad, double* buffer, long long size,
                                          double lr, double momentum, double weight_decay, int has_buffer,
                                          int nesterov) {
    sgd_update_items<double>(param, grad, buffer, size, lr, momentum, weight_decay, has_buffer, nesterov);
}
