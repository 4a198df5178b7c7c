//! Diffusion architecture detection from tensor key sets. (Filled by the conversion work.)
