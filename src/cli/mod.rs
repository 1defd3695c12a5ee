//! The binary's command line: clap structs ([`args`]), their resolution into the library's
//! options ([`settings`]), one body per command ([`commands`]), and what goes to stderr
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
/// has no short options of several letters), and the global `-q`/`-v` moved to the end (before
/// any `--`): given before a command, clap would count them as arguments of the flag form,
/// which conflicts with commands.
pub fn args() -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os()
        .map(|a| match a.to_str() {
            Some("-ngl") => "--n-gpu-layers".into(),
            Some(s) if s.starts_with("-ngl=") => format!("--n-gpu-layers={}", &s[5..]).into(),
            _ => a,
        })
        .collect();
    let start = args.len().min(1);
    let end = args.iter().position(|a| a == "--").unwrap_or(args.len());
    let end = end.max(start);
    let global = |a: &std::ffi::OsString| {
        ["-q", "--quiet", "-v", "--verbose"].contains(&a.to_str().unwrap_or_default())
    };
    // Program name first, then the rest in order, then the global flags.
    let (flags, rest): (Vec<_>, Vec<_>) = args.drain(start..end).partition(global);
    args.splice(start..start, rest.into_iter().chain(flags));
    args
}
