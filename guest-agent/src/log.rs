//! Console logging. The agent writes one line per event to stderr, which is the console: the kernel
//! hands PID 1 `/dev/console` as fds 0–2, and `init::attach_console` reopens it if the initramfs had
//! no device node. No logging framework: the agent logs little, and a plain line is what the
//! serial console and the VMM's console capture can show.

use std::fmt;
use std::io::Write;

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Normal lifecycle events.
    Info,
    /// Something failed, the agent carries on.
    Warn,
    /// The agent cannot do what it is for.
    Error,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        })
    }
}

/// Writes one log line. Errors writing to the console are ignored: there is nowhere else to report them.
pub fn write(level: Level, args: fmt::Arguments<'_>) {
    let line = format!("accordion-agent: {level}: {args}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Logs at info level.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Info, format_args!($($arg)*)) };
}

/// Logs at warn level.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Warn, format_args!($($arg)*)) };
}

/// Logs at error level.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log::write($crate::log::Level::Error, format_args!($($arg)*)) };
}
