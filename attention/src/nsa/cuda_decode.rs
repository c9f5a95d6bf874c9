//! NSA decode on the device (feature `cuda`): [`NsaDeviceCache`], the device counterpart of
//! [`super::NsaCache`]. The cache keeps each sequence's keys and values in fixed-capacity slots
//! on the device and completes a compressed block (mean pooling, on the device, bit for bit the
//! CPU cache's) each time `d` more tokens finish one; [`NsaDeviceCache::decode`] runs one step
//! for the newest token of every sequence: compressed branch and selection scores, top-n, the
//! selected and window branches and the gated combine in one kernel, one CTA per (sequence, kv
//! head) so each K/V row is read once for all the group's heads (`decode.cu` says how).
//!
//! Same conventions as the CPU cache (forced blocks, ties to the lower index, the overlap rule,
//! separate window K/V); storage bf16 or f16; launched on `gpu`'s stream, inputs as
//! [`DeviceView`]s.

use squid_cuda::launch::{DeviceBuffer, DeviceCopy, DeviceView, DeviceViewMut, Gpu, LaunchDims};
use squid_cuda::Element;

use super::{NsaConfig, DECODE_KERNEL};
use crate::dense::cuda::{device_err, dtype_suffix};
use crate::layout::{expect_len, numel};
use crate::{Error, Heads};

/// Threads per CTA of the step kernel (`SQUID_NSD_THREADS`).
const THREADS: u32 = 128;
/// Query heads a step CTA holds at once (`SQUID_NSD_HC`): larger groups run in chunks of it.
pub const HEAD_CHUNK: usize = 16;
/// Largest head dim of the step kernel (`SQUID_NSD_DMAX`).
pub const MAX_HEAD_DIM: usize = 256;
/// Header ints of the step kernel's meta (`SQUID_NSD_HEADER`).
const HEADER: usize = 17;

/// `x` as an `i32` kernel argument, or the error naming what is too large.
fn as_i32(what: &str, x: usize) -> Result<i32, Error> {
    i32::try_from(x).map_err(|_| Error::Unsupported(format!("{what} = {x} exceeds the kernels' 32-bit indices")))
}

/// Finds `name` among the decode kernel's declared entries (they are `&'static`).
fn entry(name: &str) -> Result<&'static str, Error> {
    DECODE_KERNEL
        .entries
        .iter()
        .copied()
        .find(|e| *e == name)
        .ok_or_else(|| Error::Unsupported(format!("no kernel entry {name}")))
}

/// Keys and values of one branch: `[seqs][capacity][HKV][D]`.
#[derive(Debug)]
struct KvPair<T> {
    k: DeviceBuffer<T>,
    v: DeviceBuffer<T>,
}

/// A device decode cache for a batch of sequences, each holding up to `capacity` tokens.
#[derive(Debug)]
pub struct NsaDeviceCache<T> {
    cfg: NsaConfig,
    heads: Heads,
    capacity: usize,
    /// Compressed blocks a sequence can hold: [`NsaConfig::num_cmp_blocks`] of `capacity`.
    max_blocks: usize,
    kv: KvPair<T>,
    win: Option<KvPair<T>>,
    /// `[seqs][max_blocks][HKV][Dk]`, `[seqs][max_blocks][HKV][Dv]`.
    cmp: KvPair<T>,
    lens: Vec<usize>,
}

/// Output of one device decode step.
#[derive(Debug)]
pub struct NsaDeviceDecodeOutput<T> {
    /// `[num_seqs, HQ, Dv]`: the newest token of each sequence.
    pub o: DeviceBuffer<T>,
    /// `[num_seqs, HKV, n]`: its chosen blocks, ascending, [`super::NO_BLOCK`]-padded.
    pub indices: DeviceBuffer<u32>,
}

impl<T: Element + DeviceCopy> NsaDeviceCache<T> {
    /// An empty cache for `num_seqs` sequences of up to `capacity` tokens each, its buffers
    /// allocated on `gpu`. With `separate_win` the window branch has its own keys and values.
    pub fn new(
        gpu: &Gpu,
        cfg: NsaConfig,
        heads: Heads,
        num_seqs: usize,
        capacity: usize,
        separate_win: bool,
    ) -> Result<Self, Error> {
        cfg.validate()?;
        heads.validate()?;
        dtype_suffix::<T>()?;
        let (hkv, dk, dv) = (heads.num_kv_heads, heads.head_dim_k, heads.head_dim_v);
        if dk > MAX_HEAD_DIM || dv > MAX_HEAD_DIM {
            return Err(Error::Unsupported(format!(
                "head dims {dk} / {dv}: the device NSA decode takes head dims up to {MAX_HEAD_DIM}"
            )));
        }
        let max_blocks = cfg.num_cmp_blocks(capacity);
        // The kernels index tokens and blocks with 32-bit ints, elements with 64-bit.
        as_i32("capacity", capacity)?;
        as_i32("num_seqs x HKV", numel("CTAs", &[num_seqs, hkv])?)?;
        as_i32("HQ x Dk", numel("q row", &[heads.num_q_heads, dk])?)?;
        let pair = |rows: usize| -> Result<KvPair<T>, Error> {
            let k = numel("cache keys", &[num_seqs, rows, hkv, dk])?;
            let v = numel("cache values", &[num_seqs, rows, hkv, dv])?;
            Ok(KvPair { k: gpu.zeros(k).map_err(device_err)?, v: gpu.zeros(v).map_err(device_err)? })
        };
        Ok(Self {
            cfg,
            heads,
            capacity,
            max_blocks,
            kv: pair(capacity)?,
            win: if separate_win { Some(pair(capacity)?) } else { None },
            cmp: pair(max_blocks)?,
            lens: vec![0; num_seqs],
        })
    }

    /// Tokens cached for sequence `seq`.
    pub fn len(&self, seq: usize) -> usize {
        self.lens.get(seq).copied().unwrap_or(0)
    }

    /// Whether no sequence holds a token.
    pub fn is_empty(&self) -> bool {
        self.lens.iter().all(|&l| l == 0)
    }

    /// Tokens a sequence can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Compressed blocks sequence `seq` holds.
    pub fn blocks(&self, seq: usize) -> usize {
        self.cfg.num_cmp_blocks(self.len(seq))
    }

    /// Sequence `seq`'s compressed keys and values so far, copied to the host (`[blocks, HKV,
    /// Dk]`, `[blocks, HKV, Dv]`, as [`super::NsaCache::compressed`]).
    pub fn compressed_to_host(&self, gpu: &Gpu, seq: usize) -> Result<(Vec<T>, Vec<T>), Error> {
        if seq >= self.lens.len() {
            return Err(Error::Cache(format!("sequence {seq} of a cache for {}", self.lens.len())));
        }
        let h = self.heads;
        let nb = self.blocks(seq);
        let get = |buf: &DeviceBuffer<T>, d: usize| -> Result<Vec<T>, Error> {
            let row = h.num_kv_heads * d;
            let start = seq * self.max_blocks * row;
            let view = buf.view().slice(start..start + nb * row).map_err(device_err)?;
            gpu.download_view(&view).map_err(device_err)
        };
        Ok((get(&self.cmp.k, h.head_dim_k)?, get(&self.cmp.v, h.head_dim_v)?))
    }

    /// Appends `counts[s]` tokens to each sequence `s`: `k [sum counts, HKV, Dk]`, `v [sum
    /// counts, HKV, Dv]` packed in sequence order, and the window branch's own `(k, v)` when the
    /// cache was made with `separate_win`. Completes, on the device, the compressed blocks the
    /// new tokens finish.
    pub fn append<'a>(
        &mut self,
        gpu: &Gpu,
        counts: &[usize],
        k: impl Into<DeviceView<'a, T>>,
        v: impl Into<DeviceView<'a, T>>,
        win: Option<(DeviceView<'a, T>, DeviceView<'a, T>)>,
    ) -> Result<(), Error> {
        let (k, v) = (k.into(), v.into());
        let h = self.heads;
        let (hkv, dk, dv) = (h.num_kv_heads, h.head_dim_k, h.head_dim_v);
        let ns = self.lens.len();
        expect_len("counts", counts.len(), ns, "[num_seqs]")?;
        let total = counts
            .iter()
            .try_fold(0usize, |a, &c| a.checked_add(c))
            .ok_or_else(|| Error::Shape("counts overflow".into()))?;
        expect_len("k", k.len(), numel("k", &[total, hkv, dk])?, "[sum counts, HKV, Dk]")?;
        expect_len("v", v.len(), numel("v", &[total, hkv, dv])?, "[sum counts, HKV, Dv]")?;
        match (&self.win, &win) {
            (Some(_), Some((kw, vw))) => {
                expect_len("k_win", kw.len(), numel("k_win", &[total, hkv, dk])?, "[sum counts, HKV, Dk]")?;
                expect_len("v_win", vw.len(), numel("v_win", &[total, hkv, dv])?, "[sum counts, HKV, Dv]")?;
            }
            (None, None) => {}
            (Some(_), None) => return Err(Error::Cache("this cache needs the window branch's own k, v".into())),
            (None, Some(_)) => return Err(Error::Cache("this cache shares k, v with the window branch".into())),
        }
        for (s, (&len, &c)) in self.lens.iter().zip(counts).enumerate() {
            if len.checked_add(c).is_none_or(|n| n > self.capacity) {
                return Err(Error::Cache(format!(
                    "sequence {s} holds {len} tokens: {c} more exceed the capacity {}",
                    self.capacity
                )));
            }
        }
        if total == 0 {
            return Ok(());
        }
        let cfg = self.cfg;
        let mut dst_rows = Vec::new();
        dst_rows.try_reserve_exact(total).map_err(|_| Error::OutOfMemory { what: "append table", bytes: total * 8 })?;
        let mut blocks = Vec::new();
        for (s, (&len, &c)) in self.lens.iter().zip(counts).enumerate() {
            let base = s * self.capacity;
            dst_rows.extend((len..len + c).map(|i| (base + i) as i64));
            for b in cfg.num_cmp_blocks(len)..cfg.num_cmp_blocks(len + c) {
                blocks.extend([(s * self.max_blocks + b) as i64, (base + b * cfg.stride_cmp) as i64]);
            }
        }
        let sfx = dtype_suffix::<T>()?;
        let dst_rows = gpu.upload(&dst_rows).map_err(device_err)?;
        let copy = |src: DeviceView<'_, T>, dst: &mut DeviceBuffer<T>, d: usize| {
            append_rows(gpu, sfx, src, dst, &dst_rows, total, hkv * d)
        };
        copy(k, &mut self.kv.k, dk)?;
        copy(v, &mut self.kv.v, dv)?;
        if let (Some(w), Some((kw, vw))) = (self.win.as_mut(), win) {
            copy(kw, &mut w.k, dk)?;
            copy(vw, &mut w.v, dv)?;
        }
        if !blocks.is_empty() {
            let nb = blocks.len() / 2;
            let table = gpu.upload(&blocks).map_err(device_err)?;
            // SAFETY: the entry is (const T* x, T* out, const long long* table, long long n, int
            // row, int l, float inv_l); out has n = nb * row elements' worth of destination rows
            // (each a slot s * max_blocks + b, b < max_blocks), and each block's source rows
            // first .. first + l lie inside its sequence's appended tokens.
            let compress = unsafe {
                gpu.typed_kernel::<(&DeviceBuffer<T>, &mut DeviceBuffer<T>, &DeviceBuffer<i64>, i64, i32, i32, f32)>(
                    &DECODE_KERNEL,
                    entry(&format!("squid_nsa_dec_compress_{sfx}"))?,
                )
            }
            .map_err(device_err)?;
            let inv = 1.0 / cfg.block_cmp as f32;
            let l = as_i32("l", cfg.block_cmp)?;
            for (src, dst, d) in [(&self.kv.k, &mut self.cmp.k, dk), (&self.kv.v, &mut self.cmp.v, dv)] {
                let row = hkv * d;
                let n = numel("compressed elements", &[nb, row])?;
                compress
                    .launch(
                        gpu,
                        LaunchDims::linear(n, 256, 65_535),
                        (src, dst, &table, n as i64, as_i32("row", row)?, l, inv),
                    )
                    .map_err(device_err)?;
            }
        }
        for (len, &c) in self.lens.iter_mut().zip(counts) {
            *len += c;
        }
        Ok(())
    }

    /// The NSA output of each sequence's newest token: `q [num_seqs, HQ, Dk]`, `gates
    /// [num_seqs, HQ, 3]`. Every sequence must hold at least one token.
    pub fn decode<'a>(
        &self,
        gpu: &Gpu,
        q: impl Into<DeviceView<'a, T>>,
        gates: impl Into<DeviceView<'a, T>>,
    ) -> Result<NsaDeviceDecodeOutput<T>, Error> {
        let h = self.heads;
        let ns = self.lens.len();
        let mut o = gpu.zeros(numel("o", &[ns, h.num_q_heads, h.head_dim_v])?).map_err(device_err)?;
        let mut indices =
            gpu.zeros(numel("indices", &[ns, h.num_kv_heads, self.cfg.num_selected])?).map_err(device_err)?;
        self.decode_into(gpu, q, gates, o.view_mut(), indices.view_mut())?;
        Ok(NsaDeviceDecodeOutput { o, indices })
    }

    /// [`NsaDeviceCache::decode`] into the caller's `o [num_seqs, HQ, Dv]` and `indices
    /// [num_seqs, HKV, n]`.
    pub fn decode_into<'a, 'b>(
        &self,
        gpu: &Gpu,
        q: impl Into<DeviceView<'a, T>>,
        gates: impl Into<DeviceView<'a, T>>,
        o: impl Into<DeviceViewMut<'b, T>>,
        indices: impl Into<DeviceViewMut<'b, u32>>,
    ) -> Result<(), Error> {
        let (q, gates, o, indices) = (q.into(), gates.into(), o.into(), indices.into());
        let (cfg, h) = (&self.cfg, &self.heads);
        let (hq, hkv, dk, dv, n) = (h.num_q_heads, h.num_kv_heads, h.head_dim_k, h.head_dim_v, cfg.num_selected);
        let ns = self.lens.len();
        expect_len("q", q.len(), numel("q", &[ns, hq, dk])?, "[num_seqs, HQ, Dk]")?;
        expect_len("gates", gates.len(), numel("gates", &[ns, hq, 3])?, "[num_seqs, HQ, 3]")?;
        expect_len("o", o.len(), numel("o", &[ns, hq, dv])?, "[num_seqs, HQ, Dv]")?;
        expect_len("indices", indices.len(), numel("indices", &[ns, hkv, n])?, "[num_seqs, HKV, n]")?;
        if let Some(s) = self.lens.iter().position(|&l| l == 0) {
            return Err(Error::Cache(format!("sequence {s} is empty: append its token before decoding")));
        }
        if ns == 0 {
            return Ok(());
        }
        let sfx = dtype_suffix::<T>()?;
        let max_len = self.lens.iter().copied().max().unwrap_or(0);
        let sb = cfg.num_cmp_blocks(max_len).max(1);
        let max_slc = cfg.num_slc_blocks(max_len).max(1);
        let mut meta = vec![
            as_i32("HQ", hq)?,
            as_i32("HKV", hkv)?,
            as_i32("Dk", dk)?,
            as_i32("Dv", dv)?,
            as_i32("capacity", self.capacity)?,
            as_i32("compressed blocks", self.max_blocks)?,
            as_i32("l", cfg.block_cmp)?,
            as_i32("d", cfg.stride_cmp)?,
            as_i32("l'", cfg.block_slc)?,
            as_i32("n", n)?,
            as_i32("w", cfg.window.min(self.capacity.max(1)))?,
            as_i32("num_initial", cfg.num_initial.min(n))?,
            as_i32("num_local", cfg.num_local.min(n))?,
            i32::from(self.win.is_some()),
            as_i32("selection blocks", max_slc)?,
            cfg.softmax_scale(h).to_bits() as i32,
            as_i32("compressed blocks", sb)?,
        ];
        debug_assert_eq!(meta.len(), HEADER);
        for &len in &self.lens {
            meta.extend([as_i32("length", len)?, as_i32("blocks", cfg.num_cmp_blocks(len))?]);
        }
        let ctas = ns * hkv;
        let per_cta = numel("scratch", &[HEAD_CHUNK + 1, sb])?
            .checked_add(max_slc)
            .and_then(|x| x.checked_add(h.group().checked_mul(dv)?))
            .ok_or_else(|| Error::Shape("decode scratch overflows".into()))?;
        let mut scratch = gpu.zeros::<f32>(numel("scratch", &[ctas, per_cta])?).map_err(device_err)?;
        let meta = gpu.upload(&meta).map_err(device_err)?;
        let win = self.win.as_ref().unwrap_or(&self.kv);
        type StepArgs<'a, T> = (
            DeviceView<'a, T>,
            DeviceView<'a, T>,
            &'a DeviceBuffer<T>,
            &'a DeviceBuffer<T>,
            &'a DeviceBuffer<T>,
            &'a DeviceBuffer<T>,
            &'a DeviceBuffer<T>,
            &'a DeviceBuffer<T>,
            DeviceViewMut<'a, T>,
            DeviceViewMut<'a, u32>,
            &'a mut DeviceBuffer<f32>,
            &'a DeviceBuffer<i32>,
        );
        // SAFETY: the entry is (q, gates, k, v, k_win, v_win, k_cmp, v_cmp, o, indices, scratch,
        // meta) as `decode.cu` documents; one CTA per (sequence, kv head) reads its sequence's
        // first `len <= capacity` cache rows and `blocks <= max_blocks` compressed rows, q and
        // gates rows of its heads (lengths checked above), writes its heads' o rows, its n index
        // slots and its own scratch region of per_cta floats (the layout `decode.cu` computes
        // from sb, max_slc, group and Dv, as here).
        let kernel = unsafe {
            gpu.typed_kernel::<StepArgs<'_, T>>(&DECODE_KERNEL, entry(&format!("squid_nsa_dec_step_{sfx}"))?)
        }
        .map_err(device_err)?;
        let dims = LaunchDims { grid: (as_i32("CTAs", ctas)? as u32, 1, 1), block: (THREADS, 1, 1), shared_bytes: 0 };
        kernel
            .launch(
                gpu,
                dims,
                (
                    q,
                    gates,
                    &self.kv.k,
                    &self.kv.v,
                    &win.k,
                    &win.v,
                    &self.cmp.k,
                    &self.cmp.v,
                    o,
                    indices,
                    &mut scratch,
                    &meta,
                ),
            )
            .map_err(device_err)
    }
}

/// Copies `src [total, row]` into rows `dst_rows` of `dst`.
fn append_rows<T: Element + DeviceCopy>(
    gpu: &Gpu,
    sfx: &str,
    src: DeviceView<'_, T>,
    dst: &mut DeviceBuffer<T>,
    dst_rows: &DeviceBuffer<i64>,
    total: usize,
    row: usize,
) -> Result<(), Error> {
    let n = numel("appended elements", &[total, row])?;
    // SAFETY: the entry is (const T* src, T* dst, const long long* dst_row, long long n, int
    // row); src has n = total * row elements (checked by the caller) and every destination row
    // is a slot s * capacity + i with i < capacity of a [seqs][capacity][row] buffer (checked by
    // the caller).
    let kernel = unsafe {
        gpu.typed_kernel::<(DeviceView<'_, T>, &mut DeviceBuffer<T>, &DeviceBuffer<i64>, i64, i32)>(
            &DECODE_KERNEL,
            entry(&format!("squid_nsa_dec_append_{sfx}"))?,
        )
    }
    .map_err(device_err)?;
    kernel
        .launch(gpu, LaunchDims::linear(n, 256, 65_535), (src, dst, dst_rows, n as i64, as_i32("row", row)?))
        .map_err(device_err)
}

#[cfg(test)]
#[path = "cuda_decode_tests.rs"]
mod tests;
