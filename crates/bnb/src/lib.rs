//! bitsandbytes quantization. (Filled by the bitsandbytes work.)
