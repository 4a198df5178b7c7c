//! Quantization kernels, one type per block format. (Filled by the kernels work.)
