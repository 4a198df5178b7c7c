//! The three-stage conversion. (Filled by the orchestration work.)
