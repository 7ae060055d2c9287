//! Console logging. The agent writes one line per event to stderr, which is the console: the kernel
//! hands PID 1 `/dev/console` as fds 0–2, and `init::attach_console` reopens it if the initramfs had
//! no device node. No logging framework: the agent logs little, and a plain line is what the
//! serial console and the VMM's console capture can show.

use std::fmt;
use std::io::Write;

/// Severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Detail for debugging; written only when `ACCORDION_AGENT_DEBUG` is set in the agent's
    /// environment (as PID 1: `ACCORDION_AGENT_DEBUG=1` on the kernel command line, which the kernel
    /// hands to init as an environment variable).
    Debug,
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
            Level::Debug => "debug",
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

/// Whether debug lines are written (read once: the environment does not change under PID 1).
pub fn debug_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED
        .get_or_init(|| std::env::var_os("ACCORDION_AGENT_DEBUG").is_some_and(|v| !v.is_empty()))
}

/// Logs at debug level (see [`Level::Debug`]); the arguments are not even formatted otherwise.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::log::debug_enabled() {
            $crate::log::write($crate::log::Level::Debug, format_args!($($arg)*))
        }
    };
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
