//! Streaming GGUF writer. (Filled by the container work.)

/// Writes a GGUF v3 file one tensor at a time.
#[derive(Debug)]
pub struct GgufWriter {}
