//! The local terminal during an interactive session: raw mode (restored on every exit
//! path by a guard) and the window size to send with the pty request and on SIGWINCH.

use nix::sys::termios::{self, SetArg, Termios};
use std::os::fd::BorrowedFd;

pub fn is_tty(fd: i32) -> bool {
    // SAFETY: isatty on a standard fd.
    unsafe { libc::isatty(fd) == 1 }
}

/// Columns and rows of the terminal on stdin (or stdout), if any.
pub fn window_size() -> Option<(u16, u16)> {
    for fd in [0, 1, 2] {
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ into a zeroed winsize.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ as _, &mut ws) } == 0 && ws.ws_col > 0 {
            return Some((ws.ws_col, ws.ws_row));
        }
    }
    None
}

/// Puts stdin's terminal in raw mode; the original mode comes back on drop.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    pub fn enter() -> Option<RawMode> {
        // SAFETY: fd 0 stays open for the whole process.
        let fd = unsafe { BorrowedFd::borrow_raw(0) };
        let saved = termios::tcgetattr(fd).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(fd, SetArg::TCSADRAIN, &raw).ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: as above.
        let fd = unsafe { BorrowedFd::borrow_raw(0) };
        let _ = termios::tcsetattr(fd, SetArg::TCSADRAIN, &self.saved);
    }
}
