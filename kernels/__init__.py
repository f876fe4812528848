"""Fast paths for dualnet's memory-bound fused ops, installed as ``dualnet.kernels``.

``cpu/`` holds Numba kernels, ``cuda/`` CUDA sources compiled by CuPy.  Each kernel has a NumPy
reference (in ``dualnet``) that tests hold it to.
"""
