//! Everything the binary writes to stderr besides its error line: progress, notes and, with
//! `--verbose`, details.
//!
//! Progress is an indicatif bar when stderr is a terminal. When it is not (a log file, CI, a
//! pipe), it is plain lines instead: one per stage, one per tenth of the work (or every
//! [`EVERY`] when a tenth takes longer), and the latest status every [`EVERY`], with counts
//! and ETA where known. `--quiet` silences progress and notes; `--verbose` adds the details
//! and how long each stage took.

use indicatif::{HumanBytes, HumanDuration, ProgressBar, ProgressStyle};
use std::fmt::Display;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// How much goes to stderr besides errors: `-q`, the default, `-v`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    /// Errors only.
    Quiet,
    /// Progress and notes too.
    Normal,
    /// Details and each stage's time too.
    Verbose,
}

static VERBOSITY: AtomicU8 = AtomicU8::new(Verbosity::Normal as u8);

impl Verbosity {
    /// From the global flags (clap refuses both at once).
    pub fn from_flags(quiet: bool, verbose: bool) -> Verbosity {
        match (quiet, verbose) {
            (true, _) => Verbosity::Quiet,
            (false, true) => Verbosity::Verbose,
            (false, false) => Verbosity::Normal,
        }
    }

    /// Makes this the level for the rest of the process (set once, before the command runs).
    pub fn set(self) {
        VERBOSITY.store(self as u8, Ordering::Relaxed);
    }

    fn current() -> Verbosity {
        match VERBOSITY.load(Ordering::Relaxed) {
            0 => Verbosity::Quiet,
            1 => Verbosity::Normal,
            _ => Verbosity::Verbose,
        }
    }
}

/// Plain progress lines come at least this far apart, unless a stage or a tenth of the work
/// is done sooner.
pub const EVERY: Duration = Duration::from_secs(5);

/// One line on stderr; a closed stderr is not worth failing a command for.
fn line(text: impl Display) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// `note: TEXT` on stderr, unless `--quiet`.
pub fn note(text: impl Display) {
    if Verbosity::current() >= Verbosity::Normal {
        line(format_args!("note: {text}"));
    }
}

/// A line on stderr with `--verbose` only.
pub fn detail(text: impl Display) {
    if Verbosity::current() == Verbosity::Verbose {
        line(text);
    }
}

/// `WHAT: JSON` with `--verbose` only: a resolved setting, as its report's JSON writes it.
pub fn setting(what: &str, value: &impl serde::Serialize) {
    detail(format_args!(
        "{what}: {}",
        serde_json::to_string(value).unwrap_or_default()
    ));
}

/// What a progress display counts.
#[derive(Clone, Copy)]
enum Unit {
    Bytes,
    /// Things of this name (`rows`), or unnamed.
    Items(&'static str),
}

/// Where progress goes.
enum Sink {
    /// stderr is a terminal: indicatif draws.
    Bar(ProgressBar),
    /// stderr is not a terminal: now and then a line.
    Lines {
        /// When the last line was printed.
        printed: Option<Instant>,
        /// The tenth of the work the last line reported.
        tenth: Option<u64>,
        /// A status not printed yet (shown at the end).
        unprinted: Option<String>,
    },
    /// `--quiet`.
    Silent,
}

/// Progress of one stage of a command, on stderr: see the module's documentation.
pub struct Progress {
    label: String,
    unit: Unit,
    done: u64,
    total: u64,
    started: Instant,
    sink: Sink,
}

impl Progress {
    /// Counts bytes written ([`Progress::set`]).
    pub fn bytes(label: impl Into<String>) -> Progress {
        Progress::new(
            label.into(),
            Unit::Bytes,
            "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
    }

    /// Counts items, such as layers loaded ([`Progress::set`]).
    pub fn items(label: impl Into<String>) -> Progress {
        Progress::new(
            label.into(),
            Unit::Items(""),
            "{msg} [{bar:30}] {pos}/{len} {elapsed}",
        )
    }

    /// Counts `noun` (tokens, passes) done of a total ([`Progress::set`]), with an ETA.
    pub fn counter(label: impl Into<String>, noun: &'static str) -> Progress {
        Progress::new(
            label.into(),
            Unit::Items(noun),
            &format!("{{msg}} [{{bar:30}}] {{pos}}/{{len}} {noun} eta {{eta}}"),
        )
    }

    /// Stages, each of which says how many `noun` of `total` are done ([`Progress::step`]).
    pub fn steps(label: impl Into<String>, noun: &'static str, total: u64) -> Progress {
        let mut p = Progress::new(
            label.into(),
            Unit::Items(noun),
            "{spinner} {msg} [{bar:20}] {pos}/{len} eta {eta}",
        );
        p.total = total;
        if let Sink::Bar(bar) = &p.sink {
            bar.set_length(total);
            // A stage can take minutes without a call: keep the spinner and ETA moving.
            bar.enable_steady_tick(Duration::from_millis(200));
        }
        p
    }

    /// No count: a status that changes ([`Progress::status`]).
    pub fn spinner(label: impl Into<String>) -> Progress {
        let p = Progress::new(label.into(), Unit::Items(""), "{spinner} {msg} {elapsed}");
        if let Sink::Bar(bar) = &p.sink {
            bar.enable_steady_tick(Duration::from_millis(200));
        }
        p
    }

    fn new(label: String, unit: Unit, template: &str) -> Progress {
        let sink = match Verbosity::current() {
            Verbosity::Quiet => Sink::Silent,
            _ if std::io::stderr().is_terminal() => {
                let style = ProgressStyle::with_template(template)
                    .expect("valid template")
                    .progress_chars("=> ");
                // `with_message` draws nothing yet: no empty bar before the length is known.
                Sink::Bar(
                    ProgressBar::new(0)
                        .with_style(style)
                        .with_message(label.clone()),
                )
            }
            _ => Sink::Lines {
                printed: None,
                tenth: None,
                unprinted: None,
            },
        };
        Progress {
            label,
            unit,
            done: 0,
            total: 0,
            started: Instant::now(),
            sink,
        }
    }

    /// `done` of `total` (bytes or items): unattended, a line per tenth or per [`EVERY`].
    pub fn set(&mut self, done: u64, total: u64) {
        let changed = done != self.done || self.total != total;
        (self.done, self.total) = (done, total);
        let count = self.count();
        match &mut self.sink {
            Sink::Bar(bar) => {
                bar.set_length(total);
                bar.set_position(done);
            }
            Sink::Lines { printed, tenth, .. } => {
                let now = done.saturating_mul(10).checked_div(total).unwrap_or(0);
                let due = printed.is_none_or(|t| t.elapsed() >= EVERY) && changed;
                if tenth.is_none_or(|t| now > t) || due {
                    line(format_args!("{}: {count}", self.label));
                    (*printed, *tenth) = (Some(Instant::now()), Some(now));
                }
            }
            Sink::Silent => {}
        }
    }

    /// A new stage with `done` of the total finished: unattended, one line each.
    pub fn step(&mut self, done: u64, message: impl Into<String>) {
        let message = message.into();
        self.done = done;
        let count = self.count();
        match &mut self.sink {
            Sink::Bar(bar) => {
                bar.set_position(done);
                bar.set_message(message);
            }
            Sink::Lines { printed, .. } => {
                line(format_args!("{}: {message}, {count}", self.label));
                *printed = Some(Instant::now());
            }
            Sink::Silent => {}
        }
    }

    /// What is happening now: unattended, a line at most every [`EVERY`] (and the last one at
    /// [`Progress::finish`]).
    pub fn status(&mut self, message: impl Into<String>) {
        let message = message.into();
        match &mut self.sink {
            Sink::Bar(bar) => bar.set_message(message),
            Sink::Lines {
                printed, unprinted, ..
            } => {
                if printed.is_none_or(|t| t.elapsed() >= EVERY) {
                    line(format_args!("{}: {message}", self.label));
                    (*printed, *unprinted) = (Some(Instant::now()), None);
                } else {
                    *unprinted = Some(message);
                }
            }
            Sink::Silent => {}
        }
    }

    /// Clears the bar (or prints the status not printed yet); with `--verbose`, says how long
    /// the stage took.
    pub fn finish(self) {
        match self.sink {
            Sink::Bar(bar) => bar.finish_and_clear(),
            Sink::Lines {
                unprinted: Some(message),
                ..
            } => line(format_args!("{}: {message}", self.label)),
            _ => {}
        }
        detail(format_args!(
            "{}: took {:.1} s",
            self.label,
            self.started.elapsed().as_secs_f64()
        ));
    }

    /// `3/8 layers (37%), eta 2 seconds`: the count, its share and the time left where known.
    fn count(&self) -> String {
        let (done, total) = (self.done, self.total);
        let mut text = match self.unit {
            Unit::Bytes => format!("{}/{}", HumanBytes(done), HumanBytes(total)),
            Unit::Items("") => format!("{done}/{total}"),
            Unit::Items(noun) => format!("{done}/{total} {noun} done"),
        };
        if total > 0 {
            let percent = (done.min(total) as f64 / total as f64 * 100.0) as u64;
            text.push_str(&format!(" ({percent}%)"));
        }
        if done > 0 && done < total {
            let left = self
                .started
                .elapsed()
                .mul_f64((total - done) as f64 / done as f64);
            text.push_str(&format!(", eta {}", HumanDuration(left)));
        }
        text
    }
}
