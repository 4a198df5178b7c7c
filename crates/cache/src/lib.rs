//! Where converted models live, and whether a cached one can be trusted. (Filled by the cache work.)
