//! Rebuild when bpf-linker changes: the object depends on it, and cargo cannot see that.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!("cargo:warning=bpf-linker not found in PATH: run `cargo xtask setup`"),
    }
}
