//! Fuzzes the safetensors header parser: any bytes, as a whole file, must give a header or a
//! typed error, never a panic or a huge allocation; an accepted header must satisfy the
//! invariants the converters rely on.
#![no_main]

use tensorfile::safetensors::parse_header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let file_len = data.len() as u64;
    if let Ok(header) = parse_header(data, file_len) {
        // Tensors tile the data section exactly, in order, each sized by shape x dtype.
        let mut expected = 0u64;
        for t in &header.tensors {
            assert_eq!(t.data_offsets.0, expected);
            assert_eq!(Some(t.byte_len()), t.dtype.bytes_for(t.n_elements()));
            expected = t.data_offsets.1;
        }
        assert_eq!(header.data_start + expected, file_len);
    }
});
