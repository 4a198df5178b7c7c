//! Fuzzes the GGUF reader on arbitrary bytes: it must return a typed error or a file whose
//! every tensor's data slice has exactly the validated length, and never panic or allocate
//! beyond what the input backs.
#![no_main]

use std::path::Path;

use gguf::GgufFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match GgufFile::parse_header(data, Path::new("fuzz.gguf")) {
        Ok(file) => {
            for t in &file.tensors {
                assert_eq!(file.tensor_data(t).len() as u64, t.byte_len());
                assert!(file.data_offset + t.offset + t.byte_len() <= file.file_len());
            }
            for (key, _) in &file.metadata {
                assert!(file.get(key).is_some());
            }
        }
        Err(e) => {
            // Every content error carries its kind and renders as "PATH: problem".
            assert!(e.to_string().starts_with("fuzz.gguf: "));
        }
    }
});
