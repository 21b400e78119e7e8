//! Whether anyone opened a file: an inotify watch for `IN_OPEN` (tests that prove a
//! process never read a file it was pointed at).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// An inotify watch on one file for opens.
pub struct OpenWatch {
    fd: OwnedFd,
}

impl OpenWatch {
    pub fn new(path: &Path) -> io::Result<OpenWatch> {
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::other("a NUL in the path"))?;
        // SAFETY: inotify_init1 has no preconditions; the descriptor is ours alone.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: a valid inotify fd and a NUL-terminated path.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c_path.as_ptr(), libc::IN_OPEN) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OpenWatch { fd })
    }

    /// Whether the file was opened since the watch began (or the last call).
    pub fn opened(&self) -> bool {
        let mut buf = [0u8; 4096];
        // SAFETY: `buf` is writable for its length; a non-blocking read.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        n > 0
    }
}
