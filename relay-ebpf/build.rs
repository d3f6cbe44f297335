//! The verifier accepts a bpf_loop callback only with BTF function info, which bpf-linker
//! emits from the debug info when asked.
fn main() {
    println!("cargo:rustc-link-arg=--btf");
}
