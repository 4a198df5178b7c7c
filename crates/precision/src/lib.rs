//! Precision conversion of safetensors files. (Filled by the precision work.)
