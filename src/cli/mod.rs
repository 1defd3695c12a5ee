//! The binary's command line: clap structs ([`args`]), their resolution into the library's
//! options ([`settings`]), one body per command ([`commands`]), and progress on stderr
//! ([`progress`]).

pub mod args;
pub mod commands;
pub mod progress;
pub mod settings;

/// `--version`: the crate version, the commit it was built from and whether CUDA is in.
#[cfg(feature = "cuda")]
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("VIBEOFFLOAD_COMMIT"),
    ", features: cuda)"
);
/// `--version`: the crate version, the commit it was built from and whether CUDA is in.
#[cfg(not(feature = "cuda"))]
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("VIBEOFFLOAD_COMMIT"),
    ", features: none, CPU only)"
);

/// The command line with llama.cpp's `-ngl N` spelled as this tool's `--n-gpu-layers N` (clap
/// has no short options of several letters).
pub fn args() -> Vec<std::ffi::OsString> {
    std::env::args_os()
        .map(|a| match a.to_str() {
            Some("-ngl") => "--n-gpu-layers".into(),
            Some(s) if s.starts_with("-ngl=") => format!("--n-gpu-layers={}", &s[5..]).into(),
            _ => a,
        })
        .collect()
}
