#!/usr/bin/env python3
"""PyTorch's SDPA (its CPU flash kernel) side by side with squid's dense attention.

One run, the same inputs, alternating calls (torch, squid, torch, squid, ...), medians and
their ratio. squid runs in `squid-peer-server` (benches/src/bin/peer_server.rs), which writes
the inputs that both sides read and times its own calls; torch is timed here around the call.
Both use every CPU by default (`--threads`). Needs torch (a CPU wheel is enough); torch is never
a CI dependency. Without torch, `--protocol-only` checks the server side alone.

    cargo build --release -p squid-benches --bin squid-peer-server
    python3 benches/peers/sdpa_side_by_side.py --t 1024,2048,4096,8192,16384

Prints one row per (T, mode): medians of each side, ratio = torch / squid (> 1: squid faster),
and the largest |difference| between the two outputs (and gradients for fwdbwd).

`--before PATH` adds a second squid server (another build, e.g. the previous commit's, copied
aside) to the alternation: torch, squid, before, torch, squid, before, ...; the row then also
prints before / squid (> 1: this build is faster). `--fma-peak GFLOPS` (from `squid-bench
machine`, same window) adds each side's GFLOP/s as a fraction of it (causal FLOPs: 4 T^2 HQ D / 2
forward, 3.5x that forward + backward, as squid-bench counts).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class Server:
    """squid-peer-server over pipes."""

    def __init__(self, exe, directory, t, hq, hkv, d, causal, threads):
        args = [exe, "--dir", directory, "--t", str(t), "--hq", str(hq), "--hkv", str(hkv), "--d", str(d)]
        if causal:
            args.append("--causal")
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        first = self.proc.stdout.readline().strip()
        if first != "ready":
            raise RuntimeError(f"squid-peer-server did not start (said {first!r}, exit {self.proc.poll()})")

    def ask(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().strip()
        if not reply or reply.startswith("error"):
            raise RuntimeError(f"squid-peer-server answered {reply!r} to {command!r}")
        return reply

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=30)


def protocol_check(server, directory, t, hq, hkv, d):
    """Without torch: every command answers and the files have the sizes the layout says."""
    for command in ["fwd", "fwdbwd", "out"]:
        server.ask(command)
    sizes = {"q": t * hq * d, "k": t * hkv * d, "v": t * hkv * d, "do": t * hq * d,
             "o": t * hq * d, "dq": t * hq * d, "dk": t * hkv * d, "dv": t * hkv * d}
    for name, elements in sizes.items():
        got = (Path(directory) / f"{name}.f32").stat().st_size
        if got != 4 * elements:
            raise RuntimeError(f"{name}.f32 holds {got} bytes, expected {4 * elements}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default="target/release/squid-peer-server")
    ap.add_argument("--t", default="1024,2048,4096,8192,16384", help="sequence lengths, comma-separated")
    ap.add_argument("--hq", type=int, default=8)
    ap.add_argument("--hkv", type=int, default=2)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--no-causal", action="store_true")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--samples", type=int, default=7, help="timed calls of each side per row")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--protocol-only", action="store_true", help="check the server alone (no torch)")
    ap.add_argument("--before", default=None, help="a second squid-peer-server build to alternate with")
    ap.add_argument("--fma-peak", type=float, default=None, help="FMA peak in GFLOP/s, for fractions")
    a = ap.parse_args()
    causal = not a.no_causal
    lengths = [int(x) for x in a.t.split(",")]

    if a.protocol_only:
        for t in lengths:
            with tempfile.TemporaryDirectory() as directory:
                server = Server(a.server, directory, t, a.hq, a.hkv, a.d, causal, a.threads)
                protocol_check(server, directory, t, a.hq, a.hkv, a.d)
                server.close()
        print(f"protocol ok for T = {lengths}")
        return 0

    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("torch is not installed (pip install torch --index-url https://download.pytorch.org/whl/cpu)",
              file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    # torch >= 2.5 shares K/V heads itself; older versions get them repeated outside the timing.
    gqa_native = "enable_gqa" in F.scaled_dot_product_attention.__doc__
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), squid ({a.threads} threads), "
          f"HQ={a.hq} HKV={a.hkv} D={a.d} causal={causal}, GQA {'native' if gqa_native else 'repeated K/V'}")
    header = f"{'T':>6} {'mode':<7} {'torch_s':>10} {'squid_s':>10} {'torch/squid':>12} {'max|diff|':>10}"
    if a.before:
        header += f" {'before_s':>10} {'before/squid':>12}"
    if a.fma_peak:
        header += f" {'torch%pk':>9} {'squid%pk':>9}" + (f" {'befor%pk':>9}" if a.before else "")
    print(header)

    def load(directory, name, heads, t):
        raw = bytearray((Path(directory) / f"{name}.f32").read_bytes())
        # squid's [T, H, D] -> torch's [1, H, T, D]
        return torch.frombuffer(raw, dtype=torch.float32).view(t, heads, a.d).transpose(0, 1).unsqueeze(0).contiguous()

    for t in lengths:
        with tempfile.TemporaryDirectory() as directory:
            server = Server(a.server, directory, t, a.hq, a.hkv, a.d, causal, a.threads)
            # The second build writes the same deterministic inputs into its own directory.
            before_dir = tempfile.TemporaryDirectory() if a.before else None
            before = (Server(a.before, before_dir.name, t, a.hq, a.hkv, a.d, causal, a.threads)
                      if a.before else None)
            q, k, v, d_o = (load(directory, n, h, t) for n, h in
                            [("q", a.hq), ("k", a.hkv), ("v", a.hkv), ("do", a.hq)])
            if not gqa_native:
                k, v = (x.repeat_interleave(a.hq // a.hkv, dim=1).contiguous() for x in (k, v))
            extra = {"enable_gqa": True} if gqa_native else {}

            def torch_fwd():
                with torch.no_grad():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **extra)

            leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]

            def torch_fwdbwd():
                for x in leaves:
                    x.grad = None
                o = F.scaled_dot_product_attention(*leaves, is_causal=causal, **extra)
                o.backward(d_o)
                return o

            # Agreement, once: our outputs against torch's.
            server.ask("out")
            o_torch = torch_fwdbwd().detach()
            diffs = [(o_torch - load(directory, "o", a.hq, t)).abs().max().item(),
                     (leaves[0].grad - load(directory, "dq", a.hq, t)).abs().max().item()]
            if gqa_native:
                diffs += [(leaves[1].grad - load(directory, "dk", a.hkv, t)).abs().max().item(),
                          (leaves[2].grad - load(directory, "dv", a.hkv, t)).abs().max().item()]
            for mode in a.modes.split(","):
                call = torch_fwd if mode == "fwd" else torch_fwdbwd
                call()
                server.ask(mode)  # one warm-up call each
                if before:
                    before.ask(mode)
                ours, theirs, prev = [], [], []
                for _ in range(a.samples):
                    start = time.perf_counter()
                    call()
                    theirs.append(time.perf_counter() - start)
                    ours.append(float(server.ask(mode)))
                    if before:
                        prev.append(float(before.ask(mode)))
                tm, sm = statistics.median(theirs), statistics.median(ours)
                diff = diffs[0] if mode == "fwd" else max(diffs)
                row = f"{t:>6} {mode:<7} {tm:>10.5f} {sm:>10.5f} {tm / sm:>12.2f} {diff:>10.2e}"
                if before:
                    bm = statistics.median(prev)
                    row += f" {bm:>10.5f} {bm / sm:>12.2f}"
                if a.fma_peak:
                    flop = 4.0 * t * t * a.hq * a.d / (2.0 if causal else 1.0) * (1.0 if mode == "fwd" else 3.5)
                    row += "".join(f" {flop / x / 1e9 / a.fma_peak:>9.1%}" for x in [tm, sm] + ([bm] if before else []))
                print(row, flush=True)
            server.close()
            if before:
                before.close()
                before_dir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
