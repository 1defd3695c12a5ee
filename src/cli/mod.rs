//! The binary's command line: clap structs ([`args`]), their resolution into the library's
//! options ([`settings`]), and one body per command ([`commands`]).

pub mod args;
pub mod commands;
pub mod settings;
