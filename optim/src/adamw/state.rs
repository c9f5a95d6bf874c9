//! Optimizer state in a safetensors file: per tensor i, `{i}.weight` (f32 master weights, or the
//! f32 parameters themselves), `{i}.exp_avg`, `{i}.exp_avg_sq` and, with amsgrad,
//! `{i}.max_exp_avg_sq`, all f32 1-D; the metadata holds the step, the hyper-parameters, the
//! parameter storage type, the tensor count and a blake3 checksum of the tensors. Written
//! atomically (temporary file in the same directory, fsync, rename, fsync of the directory);
//! read back with every check: header, names, shapes, dtype, config, checksum.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use squid_cuda::dtype::{DType, Element};

use super::{AdamW, AdamWConfig};
use crate::Error;

const FORMAT: &str = "squid-adamw-v1";

fn err(path: &Path, why: impl Into<String>) -> Error {
    Error::Checkpoint { path: path.display().to_string(), why: why.into() }
}

fn config_string(c: &AdamWConfig) -> String {
    format!(
        "beta1={} beta2={} eps={} weight_decay={} amsgrad={} max_grad_norm={:?}",
        c.beta1, c.beta2, c.eps, c.weight_decay, c.amsgrad, c.max_grad_norm
    )
}

/// Name, data in order: the list that is both written and checksummed.
fn named_tensors<'a>(opt: &'a AdamW, weights: &[&'a [f32]]) -> Vec<(String, &'a [f32])> {
    let mut out = Vec::new();
    for (i, (t, w)) in opt.tensors.iter().zip(weights).enumerate() {
        out.push((format!("{i}.weight"), *w));
        out.push((format!("{i}.exp_avg"), t.m.as_slice()));
        out.push((format!("{i}.exp_avg_sq"), t.v.as_slice()));
        if let Some(vm) = &t.v_max {
            out.push((format!("{i}.max_exp_avg_sq"), vm.as_slice()));
        }
    }
    out
}

fn checksum<'a>(tensors: impl Iterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut h = blake3::Hasher::new();
    for (name, bytes) in tensors {
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    h.finalize().to_hex().to_string()
}

impl AdamW {
    /// Writes weights, moments and step to `path` atomically. `params` are the parameters the
    /// optimizer steps (their f32 values are saved when they are f32; for bf16/f16 the masters are).
    pub fn save<T: Element>(&self, path: &Path, params: &[&[T]]) -> Result<(), Error> {
        self.check_params::<T>(params.iter().map(|p| p.len()))?;
        let weights: Vec<&[f32]> = if self.dtype == DType::F32 {
            // T is f32 here (checked above), so this cast is the identity.
            params.iter().map(|p| bytemuck::cast_slice::<T, f32>(p)).collect()
        } else {
            self.tensors.iter().map(|t| t.master.as_deref().unwrap_or(&[])).collect()
        };
        let named = named_tensors(self, &weights);
        let sum = checksum(named.iter().map(|(n, d)| (n.as_str(), bytemuck::cast_slice::<f32, u8>(d))));
        let views = named
            .iter()
            .map(|(n, d)| {
                TensorView::new(Dtype::F32, vec![d.len()], bytemuck::cast_slice(d))
                    .map(|v| (n.clone(), v))
                    .map_err(|e| err(path, e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("step".to_string(), self.step.to_string()),
            ("config".to_string(), config_string(&self.config)),
            ("param_dtype".to_string(), self.dtype.name().to_string()),
            ("num_tensors".to_string(), self.tensors.len().to_string()),
            ("blake3".to_string(), sum),
        ]);
        let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| err(path, e.to_string()))?;
        write_atomic(path, &bytes)
    }

    /// Restores weights, moments and step from `path` into this optimizer (built for the same
    /// parameter shapes, storage type and hyper-parameters) and writes the weights into `params`.
    /// Nothing is changed unless the whole file checks out.
    pub fn load<T: Element>(&mut self, path: &Path, params: &mut [&mut [T]]) -> Result<(), Error> {
        self.check_params::<T>(params.iter().map(|p| p.len()))?;
        let bytes = std::fs::read(path).map_err(|e| err(path, e.to_string()))?;
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| err(path, e.to_string()))?;
        let meta = header.metadata().clone().ok_or_else(|| err(path, "no metadata"))?;
        let get = |k: &str| meta.get(k).cloned().ok_or_else(|| err(path, format!("metadata has no `{k}`")));
        if get("format")? != FORMAT {
            return Err(err(path, format!("format is not {FORMAT}")));
        }
        if get("param_dtype")? != self.dtype.name() {
            return Err(err(
                path,
                format!("saved for {} parameters, this optimizer has {}", get("param_dtype")?, self.dtype.name()),
            ));
        }
        if get("config")? != config_string(&self.config) {
            return Err(err(
                path,
                format!("saved with config `{}`, this optimizer has `{}`", get("config")?, config_string(&self.config)),
            ));
        }
        if get("num_tensors")? != self.tensors.len().to_string() {
            return Err(err(
                path,
                format!("{} tensors saved, this optimizer has {}", get("num_tensors")?, self.tensors.len()),
            ));
        }
        let step: u64 = get("step")?.parse().map_err(|_| err(path, "step is not a number"))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| err(path, e.to_string()))?;
        // Read every expected tensor, checking dtype and shape, then the checksum, before touching state.
        let mut loaded: Vec<(String, Vec<f32>)> = Vec::new();
        let empty: Vec<&[f32]> = self.tensors.iter().map(|t| t.m.as_slice()).collect();
        for (name, like) in named_tensors(self, &empty) {
            let view = st.tensor(&name).map_err(|e| err(path, format!("tensor `{name}`: {e}")))?;
            if view.dtype() != Dtype::F32 || view.shape() != [like.len()] {
                return Err(err(
                    path,
                    format!("tensor `{name}` is {:?} {:?}, expected F32 [{}]", view.dtype(), view.shape(), like.len()),
                ));
            }
            let data: Vec<f32> =
                view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            loaded.push((name, data));
        }
        if st.len() != loaded.len() {
            return Err(err(path, format!("{} tensors in the file, expected {}", st.len(), loaded.len())));
        }
        let sum = checksum(loaded.iter().map(|(n, d)| (n.as_str(), bytemuck::cast_slice::<f32, u8>(d))));
        if sum != get("blake3")? {
            return Err(err(path, "checksum mismatch: the file is corrupt"));
        }
        let mut it = loaded.into_iter().map(|(_, d)| d);
        for (t, p) in self.tensors.iter_mut().zip(params.iter_mut()) {
            let w = it.next().unwrap_or_default();
            for (dst, &src) in p.iter_mut().zip(&w) {
                *dst = T::from_f32(src);
            }
            if t.master.is_some() {
                t.master = Some(w);
            }
            t.m = it.next().unwrap_or_default();
            t.v = it.next().unwrap_or_default();
            if t.v_max.is_some() {
                t.v_max = Some(it.next().unwrap_or_default());
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Temp file in the same directory, write, fsync, rename over `path`, fsync the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| err(path, e.to_string()))?;
    tmp.write_all(bytes).map_err(|e| err(path, e.to_string()))?;
    tmp.as_file().sync_all().map_err(|e| err(path, e.to_string()))?;
    tmp.persist(path).map_err(|e| err(path, e.to_string()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all(); // best effort: not every platform can fsync a directory
    }
    Ok(())
}
