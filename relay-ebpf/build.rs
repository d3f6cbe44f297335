//! The verifier accepts a bpf_loop callback only with BTF function info, which bpf-linker
//! emits from the debug info when asked. (The host build is a stub linked by the system
//! linker, which knows no such flag.)
fn main() {
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf") {
        println!("cargo:rustc-link-arg=--btf");
    }
}
