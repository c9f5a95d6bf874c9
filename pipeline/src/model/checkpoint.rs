//! Checkpoints: one safetensors file of the weights (f32, names and shapes of
//! [`super::weights`]) with metadata
//!
//! - `format`: [`FORMAT_TAG`],
//! - `config`: the [`ModelConfig`] as JSON,
//! - `checksum`: blake3 (hex) of every tensor's little-endian bytes in the weights' order.
//!
//! Written atomically: a temp file in the same directory, fsync, rename, fsync of the
//! directory. [`Model::load`] checks the tag, the config, every tensor's dtype and shape and the
//! checksum, and answers [`Error::Checkpoint`] for a missing, truncated, corrupt or foreign file.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use super::{Model, ModelConfig};
use crate::Error;

/// The `format` metadata value of a squid policy checkpoint.
pub const FORMAT_TAG: &str = "squid-policy-v1";

fn to_bytes(t: &[f32]) -> Vec<u8> {
    t.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn checksum<'a>(tensors: impl Iterator<Item = &'a [u8]>) -> String {
    let mut h = blake3::Hasher::new();
    for t in tensors {
        h.update(&(t.len() as u64).to_le_bytes());
        h.update(t);
    }
    h.finalize().to_hex().to_string()
}

impl Model {
    /// Saves the weights and config to `path` (safetensors, atomic).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        let path = path.as_ref();
        let bytes: Vec<Vec<u8>> = self.weights().iter().map(|t| to_bytes(t)).collect();
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FORMAT_TAG.to_string());
        meta.insert("config".to_string(), self.config().to_json());
        meta.insert("checksum".to_string(), checksum(bytes.iter().map(|b| b.as_slice())));
        let shapes = self.tensor_shapes();
        let mut views = Vec::with_capacity(shapes.len());
        for ((name, shape), b) in shapes.into_iter().zip(&bytes) {
            let view = TensorView::new(Dtype::F32, shape, b)
                .map_err(|e| Error::Checkpoint { path: path.to_path_buf(), reason: format!("{name}: {e}") })?;
            views.push((name, view));
        }
        let file = safetensors::serialize(views, Some(meta))
            .map_err(|e| Error::Checkpoint { path: path.to_path_buf(), reason: format!("serialize: {e}") })?;
        crate::fsutil::write_atomic(path, &file)
    }

    /// Loads a checkpoint written by [`Model::save`], verifying tag, config, shapes and checksum.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let bad = |reason: String| Error::Checkpoint { path: path.to_path_buf(), reason };
        let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let (_, header) =
            SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        match meta.get("format") {
            Some(tag) if tag == FORMAT_TAG => {}
            Some(tag) => return Err(bad(format!("format tag `{tag}`, expected `{FORMAT_TAG}`"))),
            None => return Err(bad(format!("no format tag: not a squid policy checkpoint ({FORMAT_TAG})"))),
        }
        let config_json = meta.get("config").ok_or_else(|| bad("no model config in the metadata".into()))?;
        let config = ModelConfig::from_json(config_json).map_err(|e| bad(format!("config: {e}")))?;
        let want_sum = meta.get("checksum").ok_or_else(|| bad("no checksum in the metadata".into()))?;
        let shapes = super::weights::tensor_shapes(&config);
        if st.len() != shapes.len() {
            return Err(bad(format!("{} tensors, the config has {}", st.len(), shapes.len())));
        }
        let mut weights = Vec::with_capacity(shapes.len());
        let mut raw = Vec::with_capacity(shapes.len());
        for (name, shape) in &shapes {
            let view = st.tensor(name).map_err(|e| bad(format!("tensor {name}: {e}")))?;
            if view.dtype() != Dtype::F32 {
                return Err(bad(format!("tensor {name} is {:?}, expected F32", view.dtype())));
            }
            if view.shape() != shape.as_slice() {
                return Err(bad(format!("tensor {name} has shape {:?}, the config gives {shape:?}", view.shape())));
            }
            raw.push(view.data());
            let t: Vec<f32> =
                view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            weights.push(t);
        }
        let got_sum = checksum(raw.into_iter());
        if &got_sum != want_sum {
            return Err(bad(format!(
                "checksum mismatch: the file's data hashes to {got_sum}, its header says {want_sum}"
            )));
        }
        if let Some((i, _)) = weights.iter().enumerate().find(|(_, t)| t.iter().any(|x| !x.is_finite())) {
            return Err(bad(format!("tensor {} holds a NaN or infinity", shapes[i].0)));
        }
        Model::from_weights(config, weights).map_err(|e| bad(e.to_string()))
    }
}
