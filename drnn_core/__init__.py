"""drnn_core: the recurrent BPR model, its Numba kernels and samplers, with no I/O."""
