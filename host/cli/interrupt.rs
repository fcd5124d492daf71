//! SIGINT and SIGTERM during a single-process run: the first asks the run to stop at the next
//! step boundary (and save, when `--save` was given); a second exits at once.

use std::sync::atomic::{AtomicI32, Ordering};

static CAUGHT: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    if CAUGHT.swap(sig, Ordering::SeqCst) != 0 {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + sig) };
    }
    let msg: &[u8] = b"\ninterrupted: stopping after this step (a second Ctrl-C quits at once)\n";
    // SAFETY: write(2) is async-signal-safe; the buffer is a static string.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
}

/// Installs the handler for SIGINT and SIGTERM.
pub fn install() {
    let handler = on_signal as extern "C" fn(libc::c_int);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only touches an atomic and calls async-signal-safe functions.
        unsafe { libc::signal(sig, handler as libc::sighandler_t) };
    }
}

/// The signal caught, if any: its name and the exit status it asks for (128 + number).
pub fn caught() -> Option<(&'static str, u8)> {
    match CAUGHT.load(Ordering::SeqCst) {
        0 => None,
        s if s == libc::SIGINT => Some(("SIGINT", 130)),
        s if s == libc::SIGTERM => Some(("SIGTERM", 143)),
        s => Some(("a signal", (128 + s).clamp(0, 255) as u8)),
    }
}
