//! Command line. Hand-parsed: four flags do not justify an argument parser in PID 1.

use std::path::PathBuf;

/// Errors of the command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    /// A flag the agent does not know.
    #[error("Unknown argument {0:?}")]
    Unknown(String),
    /// A flag needs a value.
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    /// A value did not parse.
    #[error("Invalid value {value:?} for {flag}")]
    Invalid {
        /// The flag.
        flag: &'static str,
        /// The value.
        value: String,
    },
    /// Both --init and --no-init.
    #[error("--init and --no-init exclude each other")]
    Conflict,
}

/// Where to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// vsock, any CID, this port (the guest).
    Vsock(u32),
    /// A Unix socket (host tests).
    Unix(PathBuf),
}

/// Parsed options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Where to serve.
    pub listen: Listen,
    /// Whether to do PID-1 setup; `None` = only when PID 1.
    pub init: Option<bool>,
}

/// Usage text.
pub const USAGE: &str = "usage: accordion-agent [--listen-unix PATH | --vsock-port PORT] [--init | --no-init]\n\
  As PID 1 (or with --init): mounts /proc, /sys, /dev, /dev/pts, /sys/fs/cgroup, /tmp, /run, and the\n\
  virtio-fs share the kernel command line names (accordion.share=TAG) on /run/accordion/containers,\n\
  reaps orphans, powers the VM off on Shutdown. Serves accordion.agent.v1 on vsock port 1024 unless told otherwise.";

impl Options {
    /// Parses the arguments after the program name. `Ok(None)` means help was asked for.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Self>, ArgsError> {
        let mut listen = Listen::Vsock(accordion_proto::AGENT_VSOCK_PORT);
        let mut init = None;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--listen-unix" => {
                    listen = Listen::Unix(
                        args.next()
                            .ok_or(ArgsError::MissingValue("--listen-unix"))?
                            .into(),
                    )
                }
                "--vsock-port" => {
                    let value = args.next().ok_or(ArgsError::MissingValue("--vsock-port"))?;
                    let port = value.parse().map_err(|_| ArgsError::Invalid {
                        flag: "--vsock-port",
                        value,
                    })?;
                    listen = Listen::Vsock(port);
                }
                "--init" | "--no-init" => {
                    let wanted = arg == "--init";
                    if init.is_some_and(|i| i != wanted) {
                        return Err(ArgsError::Conflict);
                    }
                    init = Some(wanted);
                }
                "-h" | "--help" => return Ok(None),
                // The kernel passes unknown `key=value` boot parameters to init as arguments
                // or environment; ignore those rather than refuse to boot.
                other if std::process::id() == 1 && !other.starts_with('-') => {}
                other => return Err(ArgsError::Unknown(other.to_owned())),
            }
        }
        Ok(Some(Options { listen, init }))
    }

    /// Whether to run PID-1 setup, given our pid.
    pub fn wants_init(&self, pid: u32) -> bool {
        self.init.unwrap_or(pid == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Options>, ArgsError> {
        Options::parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn test_default_is_vsock_1024_init_when_pid1() {
        let opts = parse(&[]).expect("ok").expect("opts");
        assert_eq!(opts.listen, Listen::Vsock(1024));
        assert!(opts.wants_init(1));
        assert!(!opts.wants_init(4242));
    }

    #[test]
    fn test_listen_unix_no_init() {
        let opts = parse(&["--listen-unix", "/tmp/a.sock", "--no-init"])
            .expect("ok")
            .expect("opts");
        assert_eq!(opts.listen, Listen::Unix("/tmp/a.sock".into()));
        assert!(!opts.wants_init(1));
    }

    #[test]
    fn test_explicit_init_off_pid1() {
        assert!(parse(&["--init"])
            .expect("ok")
            .expect("opts")
            .wants_init(4242));
    }

    #[test]
    fn test_errors_named() {
        assert_eq!(
            parse(&["--listen-unix"]),
            Err(ArgsError::MissingValue("--listen-unix"))
        );
        assert_eq!(
            parse(&["--vsock-port", "x"]),
            Err(ArgsError::Invalid {
                flag: "--vsock-port",
                value: "x".into()
            })
        );
        assert_eq!(parse(&["--init", "--no-init"]), Err(ArgsError::Conflict));
        assert_eq!(
            parse(&["--bogus"]),
            Err(ArgsError::Unknown("--bogus".into()))
        );
        assert_eq!(parse(&["--help"]), Ok(None));
    }
}
