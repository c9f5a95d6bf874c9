//! Prints the PTX NVRTC emits for squid's registered kernels (sm_80), for inspection.
fn main() {
    for k in squid_cuda::KERNELS {
        for arch in [squid_cuda::Arch::SM80, squid_cuda::Arch::SM90] {
            let opts = squid_cuda::CompileOptions::for_kernel(k, arch);
            match squid_cuda::compile(k, &opts) {
                Ok(p) => println!("//==== {} {}\n{}", k.name, arch, p.text),
                Err(e) => eprintln!("{}: {e}", k.name),
            }
        }
    }
}
