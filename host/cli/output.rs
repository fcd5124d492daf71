//! Printing that never panics: a closed stdout or stderr (a reader that left, `| head -1`)
//! ends printing to it quietly, and the run goes on.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once stdout (or stderr) is found closed under us, e.g. by `| head -1`: printing to it then
/// stops quietly, and the run goes on (a checkpoint is still saved). Rust ignores SIGPIPE, so a
/// closed pipe is a write error here, which `println!` would turn into a panic.
static STDOUT_GONE: AtomicBool = AtomicBool::new(false);
static STDERR_GONE: AtomicBool = AtomicBool::new(false);

/// Writes to stdout or stderr; a failed write (a closed pipe) marks the stream gone.
/// Whether stdout's reader has gone (a write to it failed): output after that is dropped.
pub(crate) fn stdout_gone() -> bool {
    STDOUT_GONE.load(Ordering::Relaxed)
}

pub(crate) fn emit(to_stderr: bool, args: std::fmt::Arguments<'_>, newline: bool) {
    let gone = if to_stderr { &STDERR_GONE } else { &STDOUT_GONE };
    if gone.load(Ordering::Relaxed) {
        return;
    }
    let ok = if to_stderr {
        let mut e = std::io::stderr().lock();
        e.write_fmt(args).and_then(|_| if newline { e.write_all(b"\n") } else { Ok(()) })
    } else {
        let mut o = std::io::stdout().lock();
        o.write_fmt(args).and_then(|_| if newline { o.write_all(b"\n") } else { o.flush() })
    };
    if ok.is_err() {
        gone.store(true, Ordering::Relaxed);
    }
}

/// `println!` that never panics on a closed stdout.
macro_rules! outln {
    () => { $crate::cli::output::emit(false, format_args!(""), true) };
    ($($t:tt)*) => { $crate::cli::output::emit(false, format_args!($($t)*), true) };
}
/// `print!` that never panics on a closed stdout.
macro_rules! out {
    ($($t:tt)*) => { $crate::cli::output::emit(false, format_args!($($t)*), false) };
}
/// `eprintln!` that never panics on a closed stderr.
macro_rules! errln {
    ($($t:tt)*) => { $crate::cli::output::emit(true, format_args!($($t)*), true) };
}
