//! `squid-peer-server`: squid's dense attention behind a line protocol on stdin/stdout, so a peer
//! in another language (benches/peers/sdpa_side_by_side.py: PyTorch's SDPA) can time its own
//! call and ours alternately on the same inputs in one run.
//!
//! `squid-peer-server --dir DIR --t T --hq HQ --hkv HKV --d D [--causal]` writes the inputs
//! `q.f32 k.f32 v.f32 do.f32` (little-endian f32, squid's `[T, H, D]` layout) into DIR, prints
//! `ready`, then answers one line per command:
//! - `fwd` / `fwdbwd`: one forward (forward + backward) call, answered with its seconds;
//! - `out`: writes our `o.f32` (`[T, HQ, D]`) and `dq.f32 dk.f32 dv.f32` into DIR, answers `ok`;
//! - `quit`: exits.
//!
//! Errors are answered `error: ...` (and the server goes on) so the driver can report them.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use squid_attention::dense::{self, DenseConfig};
use squid_attention::Heads;

#[derive(Parser)]
#[command(name = "squid-peer-server", about = "squid dense attention behind a stdin/stdout line protocol")]
struct Cli {
    /// Where the inputs (and outputs on `out`) are written.
    #[arg(long)]
    dir: PathBuf,
    /// Sequence length (one sequence).
    #[arg(long)]
    t: usize,
    /// Query heads.
    #[arg(long, default_value_t = 8)]
    hq: usize,
    /// Key/value heads (GQA when fewer than `hq`).
    #[arg(long, default_value_t = 2)]
    hkv: usize,
    /// Head dim.
    #[arg(long, default_value_t = 64)]
    d: usize,
    /// Causal mask.
    #[arg(long)]
    causal: bool,
}

/// Deterministic inputs in [-1, 1).
fn filled(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed.wrapping_mul(40_503)) >> 8) as f32
                / (1 << 24) as f32
                * 2.0
                - 1.0
        })
        .collect()
}

/// Writes `x` as little-endian f32 through a temporary file and a rename (never a torn file).
fn write_f32(dir: &Path, name: &str, x: &[f32]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut bytes = Vec::with_capacity(x.len() * 4);
    for v in x {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(&tmp, &bytes)?;
    std::fs::rename(&tmp, dir.join(name))
}

struct Inputs {
    cfg: DenseConfig,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    d_o: Vec<f32>,
    cu: Vec<u32>,
}

impl Inputs {
    fn forward(&self) -> Result<dense::DenseOutput<f32>, String> {
        dense::forward(&self.cfg, &self.q, &self.k, &self.v, &self.cu, &self.cu).map_err(|e| e.to_string())
    }

    fn backward(&self, out: &dense::DenseOutput<f32>) -> Result<dense::DenseGrads<f32>, String> {
        dense::backward(&self.cfg, &self.q, &self.k, &self.v, &out.o, &out.lse, &self.d_o, &self.cu, &self.cu)
            .map_err(|e| e.to_string())
    }

    fn answer(&self, command: &str, dir: &Path) -> Result<String, String> {
        match command {
            "fwd" => {
                let start = Instant::now();
                std::hint::black_box(self.forward()?);
                Ok(format!("{:.9}", start.elapsed().as_secs_f64()))
            }
            "fwdbwd" => {
                let start = Instant::now();
                let out = self.forward()?;
                std::hint::black_box(self.backward(&out)?);
                Ok(format!("{:.9}", start.elapsed().as_secs_f64()))
            }
            "out" => {
                let out = self.forward()?;
                let g = self.backward(&out)?;
                for (name, x) in [("o.f32", &out.o), ("dq.f32", &g.dq), ("dk.f32", &g.dk), ("dv.f32", &g.dv)] {
                    write_f32(dir, name, x).map_err(|e| format!("writing {name}: {e}"))?;
                }
                Ok("ok".into())
            }
            other => Err(format!("unknown command `{other}` (fwd, fwdbwd, out, quit)")),
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let heads = Heads::new(cli.hq, cli.hkv, cli.d, cli.d);
    let cfg = DenseConfig { causal: cli.causal, ..DenseConfig::causal(heads) };
    let x = Inputs {
        q: filled(cli.t * cli.hq * cli.d, 1),
        k: filled(cli.t * cli.hkv * cli.d, 2),
        v: filled(cli.t * cli.hkv * cli.d, 3),
        d_o: filled(cli.t * cli.hq * cli.d, 4),
        cu: vec![0, cli.t as u32],
        cfg,
    };
    if let Err(e) = x.forward() {
        eprintln!("squid-peer-server: {e}");
        return std::process::ExitCode::FAILURE;
    }
    for (name, v) in [("q.f32", &x.q), ("k.f32", &x.k), ("v.f32", &x.v), ("do.f32", &x.d_o)] {
        if let Err(e) = write_f32(&cli.dir, name, v) {
            eprintln!("squid-peer-server: writing {name} into {}: {e}", cli.dir.display());
            return std::process::ExitCode::FAILURE;
        }
    }
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "ready");
    let _ = stdout.flush();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let command = line.trim();
        if command == "quit" {
            break;
        }
        let reply = x.answer(command, &cli.dir).unwrap_or_else(|e| format!("error: {e}"));
        if writeln!(stdout, "{reply}").and_then(|()| stdout.flush()).is_err() {
            break;
        }
    }
    std::process::ExitCode::SUCCESS
}
