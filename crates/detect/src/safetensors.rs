//! Hardened safetensors header parsing. (Filled by the detect work.)
