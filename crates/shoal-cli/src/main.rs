//! `shoal` as a plain Rust binary (the wheel ships the same code via Python).
fn main() {
    std::process::exit(shoal_cli::run(
        std::env::args().collect(),
        shoal_cli::HostInfo::default(),
    ));
}
