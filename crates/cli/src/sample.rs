//! A small deterministic flux-like sample model, for `convcache demo` and the end-to-end tests.
//!
//! The key names and shape patterns follow a Flux transformer (so detection reports the
//! architecture), with 2-D weights next to 1-D biases and norm scales (so an fp8 target shows
//! which tensors stay 16-bit). Values come from a fixed hash of (seed, tensor, element): the same
//! spec gives the same bytes on every machine.

use std::collections::BTreeMap;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use tensorfile::safetensors::Dtype;
use tensorfile::{SafetensorsWriter, TensorSpec};

/// The shape of a sample model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleSpec {
    /// Hidden size; weights are `hidden x hidden` multiples.
    pub hidden: u64,
    /// Number of double and of single blocks.
    pub blocks: u64,
    /// Changes every value (two seeds give two different models of the same shape).
    pub seed: u64,
}

impl SampleSpec {
    /// The demo's model: about 1.5 MB in f32.
    pub const DEMO: SampleSpec = SampleSpec {
        hidden: 96,
        blocks: 2,
        seed: 1,
    };

    /// The tensors of this sample, in file order, all F32.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let h = self.hidden;
        let f32_tensor = |name: String, shape: Vec<u64>| TensorSpec {
            name,
            dtype: Dtype::F32,
            shape,
        };
        let mut specs = vec![
            f32_tensor("img_in.weight".into(), vec![h, 64]),
            f32_tensor("img_in.bias".into(), vec![h]),
            f32_tensor("time_in.in_layer.weight".into(), vec![h, 256]),
            f32_tensor("time_in.in_layer.bias".into(), vec![h]),
        ];
        for b in 0..self.blocks {
            let p = format!("double_blocks.{b}");
            specs.push(f32_tensor(
                format!("{p}.img_attn.qkv.weight"),
                vec![3 * h, h],
            ));
            specs.push(f32_tensor(format!("{p}.img_attn.qkv.bias"), vec![3 * h]));
            specs.push(f32_tensor(format!("{p}.img_attn.proj.weight"), vec![h, h]));
            specs.push(f32_tensor(
                format!("{p}.img_attn.norm.query_norm.scale"),
                vec![h / 2],
            ));
            specs.push(f32_tensor(format!("{p}.img_mlp.0.weight"), vec![4 * h, h]));
            specs.push(f32_tensor(format!("{p}.img_mlp.0.bias"), vec![4 * h]));
            specs.push(f32_tensor(format!("{p}.img_mlp.2.weight"), vec![h, 4 * h]));
        }
        for b in 0..self.blocks {
            let p = format!("single_blocks.{b}");
            specs.push(f32_tensor(format!("{p}.linear1.weight"), vec![4 * h, h]));
            specs.push(f32_tensor(format!("{p}.linear1.bias"), vec![4 * h]));
            specs.push(f32_tensor(format!("{p}.norm.key_norm.scale"), vec![h / 2]));
        }
        specs.push(f32_tensor("final_layer.linear.weight".into(), vec![64, h]));
        specs.push(f32_tensor("final_layer.linear.bias".into(), vec![64]));
        specs
    }

    /// Element `index` of tensor number `tensor` (file order).
    pub fn value(&self, tensor: usize, index: u64) -> f32 {
        let bits = splitmix64(self.seed ^ ((tensor as u64) << 40) ^ index);
        // Uniform in [-1, 1), with one value in 64 scaled up so casts see a wide range.
        let unit = (bits >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
        if bits & 63 == 0 { unit * 300.0 } else { unit }
    }

    /// Writes the sample as an F32 safetensors file at `path`; returns its size in bytes.
    pub fn write(&self, path: &Path) -> io::Result<u64> {
        let specs = self.tensors();
        let mut metadata = BTreeMap::new();
        metadata.insert("format".to_owned(), "pt".to_owned());
        metadata.insert(
            "convcache.sample".to_owned(),
            format!("flux-like hidden={} blocks={}", self.hidden, self.blocks),
        );
        let file = std::fs::File::create(path)?;
        let mut writer = SafetensorsWriter::new(BufWriter::new(file), &specs, &metadata)?;
        // Chunks keep memory flat for the tens-of-MB samples the tests use.
        const CHUNK: u64 = 64 * 1024;
        let mut buf = Vec::with_capacity(CHUNK as usize * 4);
        for (t, spec) in specs.iter().enumerate() {
            let n = spec.shape.iter().product::<u64>();
            let mut start = 0;
            while start < n {
                let end = (start + CHUNK).min(n);
                buf.clear();
                for i in start..end {
                    buf.extend_from_slice(&self.value(t, i).to_le_bytes());
                }
                writer.write_chunk(&buf)?;
                start = end;
            }
        }
        let mut out = writer.finish()?;
        out.flush()?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(file.metadata()?.len())
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_spec_same_bytes_different_seed_different_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let spec = SampleSpec {
            hidden: 16,
            blocks: 1,
            seed: 7,
        };
        let a = dir.path().join("a.safetensors");
        let b = dir.path().join("b.safetensors");
        let c = dir.path().join("c.safetensors");
        spec.write(&a).unwrap();
        spec.write(&b).unwrap();
        SampleSpec { seed: 8, ..spec }.write(&c).unwrap();
        let (a, b, c) = (
            std::fs::read(a).unwrap(),
            std::fs::read(b).unwrap(),
            std::fs::read(c).unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(a.len(), c.len());
        assert_ne!(a, c);
    }

    #[test]
    fn size_matches_the_declared_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.safetensors");
        let len = SampleSpec::DEMO.write(&path).unwrap();
        let data: u64 = SampleSpec::DEMO
            .tensors()
            .iter()
            .map(|t| t.byte_len().unwrap())
            .sum();
        let header = u64::from_le_bytes(std::fs::read(&path).unwrap()[..8].try_into().unwrap());
        assert_eq!(len, 8 + header + data);
    }
}
