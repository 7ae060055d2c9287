//! Running a command for Exec: spawn (pipes or a pty), pump output in bounded chunks, feed stdin,
//! report the exit status.
//!
//! Memory stays bounded whatever the process writes or the client sends: output is read in
//! `CHUNK_BYTES` pieces into a bounded channel, so a slow client stops the pump, the pipe fills and
//! the process blocks in write(2) — backpressure all the way to the process, never a growing buffer.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch};

use crate::pty::{Pty, PtyError, PtyMaster};
use crate::reaper::{ExitStatus, Reaper, ReaperError};

/// Largest stdout/stderr chunk sent to the client.
pub const CHUNK_BYTES: usize = 32 * 1024;

/// After the process exited, how long a stdout/stderr pipe may stay silent before the exec is
/// reported finished anyway. A background grandchild (`sh -c 'sleep 100 &'`) can hold the pipe
/// open forever; data that keeps coming is always forwarded, only silence is cut short.
pub const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// PATH given to a process whose env names none (static guest binaries live in the usual places).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// ASCII EOT: what "close stdin" means on a terminal in canonical mode.
const VEOF: u8 = 0x04;

/// Errors of an exec.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The request is malformed (empty argv, NUL bytes, env entry without '=').
    #[error("Invalid exec request: {0}")]
    InvalidArgument(String),
    /// The program is not an executable file (looked up in PATH when it has no '/').
    #[error("Executable {0:?} not found")]
    NotFound(String),
    /// The process could not be started.
    #[error(transparent)]
    Spawn(#[from] ReaperError),
    /// The pseudo-terminal could not be set up.
    #[error(transparent)]
    Pty(#[from] PtyError),
    /// A stdio descriptor could not be set up.
    #[error("Cannot set up the process's stdio")]
    Stdio(#[source] io::Error),
}

/// What to run: the validated form of the wire `ExecStart`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSpec {
    /// Program and arguments; never empty.
    pub argv: Vec<String>,
    /// Environment, in order.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Run on a pty.
    pub tty: bool,
}

impl TryFrom<accordion_proto::agent::v1::ExecStart> for ExecSpec {
    type Error = ExecError;

    fn try_from(start: accordion_proto::agent::v1::ExecStart) -> Result<Self, ExecError> {
        if start.argv.is_empty() || start.argv[0].is_empty() {
            return Err(ExecError::InvalidArgument("argv is empty".into()));
        }
        if start
            .argv
            .iter()
            .chain(&start.env)
            .chain([&start.cwd])
            .any(|s| s.contains('\0'))
        {
            return Err(ExecError::InvalidArgument(
                "NUL byte in argv, env or cwd".into(),
            ));
        }
        let env = start
            .env
            .iter()
            .map(|entry| match entry.split_once('=') {
                Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
                _ => Err(ExecError::InvalidArgument(format!(
                    "env entry {entry:?} is not KEY=VALUE"
                ))),
            })
            .collect::<Result<_, _>>()?;
        let cwd = if start.cwd.is_empty() {
            PathBuf::from("/")
        } else {
            PathBuf::from(start.cwd)
        };
        Ok(ExecSpec {
            argv: start.argv,
            env,
            cwd,
            tty: start.tty,
        })
    }
}

/// Client → process events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Bytes for stdin.
    Stdin(Vec<u8>),
    /// End of stdin.
    CloseStdin,
    /// New terminal size (ignored without a tty).
    Resize {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// The client's request stream failed (bad message, connection gone): kill the exec.
    Abort,
}

/// Process → client events. `Exit` is always the last one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A chunk of stdout (of the terminal, with a tty).
    Stdout(Vec<u8>),
    /// A chunk of stderr.
    Stderr(Vec<u8>),
    /// The process ended.
    Exit(ExitStatus),
}

enum Source {
    Pipe(pipe::Receiver),
    Pty(Arc<PtyMaster>),
}

impl Source {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Source::Pipe(rx) => rx.read(buf).await,
            Source::Pty(master) => master.read(buf).await,
        }
    }
}

enum Sink {
    Pipe(Option<pipe::Sender>),
    Pty(Arc<PtyMaster>),
}

impl Sink {
    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Sink::Pipe(Some(tx)) => tx.write_all(data).await,
            // Closed by the client: later stdin is dropped, like writing after EOF.
            Sink::Pipe(None) => Ok(()),
            Sink::Pty(master) => master.write_all(data).await,
        }
    }

    async fn close(&mut self) -> io::Result<()> {
        match self {
            Sink::Pipe(tx) => {
                tx.take();
                Ok(())
            }
            Sink::Pty(master) => master.write_all(&[VEOF]).await,
        }
    }
}

/// A started process, ready to be driven by [`Running::run`].
pub struct Running {
    /// The process id.
    pub pid: u32,
    reaper: Reaper,
    exit: tokio::sync::oneshot::Receiver<ExitStatus>,
    stdin: Sink,
    stdout: Source,
    stderr: Option<Source>,
    pty: Option<Arc<PtyMaster>>,
}

fn pipe_rx(fd: Option<impl Into<OwnedFd>>) -> Result<pipe::Receiver, ExecError> {
    let fd = fd.ok_or_else(|| ExecError::Stdio(io::Error::other("pipe missing")))?;
    pipe::Receiver::from_owned_fd(fd.into()).map_err(ExecError::Stdio)
}

/// Finds `program` the way execvp(3) would, in the process's `PATH`. Done before spawning so a
/// missing program is a clear NotFound for the client rather than a child that can only exit 127
/// (and so it does not depend on the libc reporting exec failures back through posix_spawn).
pub fn resolve_program(program: &str, path: &str) -> Result<PathBuf, ExecError> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &std::path::Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let candidate = PathBuf::from(program);
        return if executable(&candidate) {
            Ok(candidate)
        } else {
            Err(ExecError::NotFound(program.to_owned()))
        };
    }
    path.split(':')
        .map(|dir| {
            if dir.is_empty() {
                PathBuf::from(".")
            } else {
                PathBuf::from(dir)
            }
            .join(program)
        })
        .find(|candidate| executable(candidate))
        .ok_or_else(|| ExecError::NotFound(program.to_owned()))
}

/// Starts the process described by `spec` through the reaper. It runs in its own process group
/// (its own session with a tty) so an abandoned exec can be killed with all its children.
pub fn start(reaper: &Reaper, spec: &ExecSpec) -> Result<Running, ExecError> {
    let path = spec
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    let program = resolve_program(&spec.argv[0], path)?;
    let mut cmd = Command::new(program);
    cmd.arg0(&spec.argv[0])
        .args(&spec.argv[1..])
        .env_clear()
        .current_dir(&spec.cwd);
    cmd.env("PATH", path);
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));

    if spec.tty {
        let Pty { master, slave } = Pty::open()?;
        let clone = |fd: &OwnedFd| fd.try_clone().map_err(ExecError::Stdio);
        cmd.stdin(clone(&slave)?)
            .stdout(clone(&slave)?)
            .stderr(slave);
        // SAFETY: the closure runs in the child between fork and exec, where only async-signal-safe
        // calls are allowed; setsid(2) and ioctl(2) are, and it touches no memory of the parent.
        // setsid makes the child a session leader so the pty (its fd 0) can become its controlling
        // terminal, which job control and ^C need.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let spawned = reaper.spawn(&mut cmd)?;
        // Our copies of the slave must be gone, or the master would never report EOF.
        drop(cmd);
        let master = Arc::new(master);
        Ok(Running {
            pid: spawned.pid,
            reaper: reaper.clone(),
            exit: spawned.exit,
            stdin: Sink::Pty(master.clone()),
            stdout: Source::Pty(master.clone()),
            stderr: None,
            pty: Some(master),
        })
    } else {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut spawned = reaper.spawn(&mut cmd)?;
        let pid = spawned.pid;
        let stdio = (|| {
            let stdin = spawned
                .child
                .stdin
                .take()
                .ok_or_else(|| ExecError::Stdio(io::Error::other("pipe missing")))?;
            let stdin = pipe::Sender::from_owned_fd(stdin.into()).map_err(ExecError::Stdio)?;
            Ok::<_, ExecError>((
                stdin,
                pipe_rx(spawned.child.stdout.take())?,
                pipe_rx(spawned.child.stderr.take())?,
            ))
        })();
        let (stdin, stdout, stderr) = match stdio {
            Ok(stdio) => stdio,
            Err(e) => {
                // Don't leave a process nobody drives.
                let _ = reaper.kill(pid, Signal::SIGKILL, true);
                return Err(e);
            }
        };
        Ok(Running {
            pid,
            reaper: reaper.clone(),
            exit: spawned.exit,
            stdin: Sink::Pipe(Some(stdin)),
            stdout: Source::Pipe(stdout),
            stderr: Some(Source::Pipe(stderr)),
            pty: None,
        })
    }
}

impl Running {
    /// A process someone else started (libcontainer's tenant process for Containers.Exec) and
    /// registered with `reaper`, driven through the parent ends of its stdio pipes.
    pub fn from_pipes(
        pid: u32,
        reaper: &Reaper,
        exit: tokio::sync::oneshot::Receiver<ExitStatus>,
        stdin: OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    ) -> Result<Running, ExecError> {
        let stdin = pipe::Sender::from_owned_fd(stdin).map_err(ExecError::Stdio)?;
        Ok(Running {
            pid,
            reaper: reaper.clone(),
            exit,
            stdin: Sink::Pipe(Some(stdin)),
            stdout: Source::Pipe(pipe_rx(Some(stdout))?),
            stderr: Some(Source::Pipe(pipe_rx(Some(stderr))?)),
            pty: None,
        })
    }

    /// Same, for a process on a pseudo-terminal whose master is `master`.
    pub fn from_pty(
        pid: u32,
        reaper: &Reaper,
        exit: tokio::sync::oneshot::Receiver<ExitStatus>,
        master: PtyMaster,
    ) -> Running {
        let master = Arc::new(master);
        Running {
            pid,
            reaper: reaper.clone(),
            exit,
            stdin: Sink::Pty(master.clone()),
            stdout: Source::Pty(master.clone()),
            stderr: None,
            pty: Some(master),
        }
    }
}

/// How an output pump ended.
#[derive(Debug, PartialEq, Eq)]
enum PumpEnd {
    Eof,
    /// Still open but silent `DRAIN_GRACE` after the exit (a background grandchild holds it).
    Abandoned,
    ClientGone,
}

async fn pump<T>(
    mut source: Source,
    events: mpsc::Sender<T>,
    map: fn(Event) -> T,
    wrap: fn(Vec<u8>) -> Event,
    mut exited: watch::Receiver<bool>,
) -> PumpEnd {
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let read = if *exited.borrow() {
            match tokio::time::timeout(DRAIN_GRACE, source.read(&mut buf)).await {
                Ok(read) => read,
                Err(_) => return PumpEnd::Abandoned,
            }
        } else {
            tokio::select! {
                read = source.read(&mut buf) => read,
                // Re-check with the grace timeout (the read is cancel-safe: nothing is lost).
                _ = exited.changed() => continue,
            }
        };
        match read {
            Ok(0) => return PumpEnd::Eof,
            Ok(n) => {
                if events.send(map(wrap(buf[..n].to_vec()))).await.is_err() {
                    return PumpEnd::ClientGone;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                crate::warn!("reading process output failed: {e}");
                return PumpEnd::Eof;
            }
        }
    }
}

impl Running {
    /// Drives the process to its end: feeds `input` to it, sends its output and finally its exit
    /// status as events (mapped by `map` to the caller's message type). If the event receiver goes
    /// away or the input aborts, the process group is killed; the exit is still awaited so no
    /// process outlives its exec unaccounted.
    pub async fn run<T: Send + 'static>(
        self,
        mut input: mpsc::Receiver<Input>,
        events: mpsc::Sender<T>,
        map: fn(Event) -> T,
    ) -> Option<ExitStatus> {
        let Running {
            pid,
            reaper,
            mut exit,
            mut stdin,
            stdout,
            stderr,
            pty,
        } = self;
        let (exited_tx, exited_rx) = watch::channel(false);
        let out_pump = tokio::spawn(pump(
            stdout,
            events.clone(),
            map,
            Event::Stdout,
            exited_rx.clone(),
        ));
        let err_pump = stderr.map(|source| {
            tokio::spawn(pump(source, events.clone(), map, Event::Stderr, exited_rx))
        });

        let kill_reaper = reaper.clone();
        let stdin_task = tokio::spawn(async move {
            while let Some(item) = input.recv().await {
                let result = match item {
                    Input::Stdin(data) => stdin.write_all(&data).await,
                    Input::CloseStdin => stdin.close().await,
                    Input::Resize { rows, cols } => match &pty {
                        Some(master) => master.resize(rows, cols),
                        None => Ok(()),
                    },
                    Input::Abort => {
                        let _ = kill_reaper.kill(pid, Signal::SIGKILL, true);
                        return;
                    }
                };
                match result {
                    Ok(()) => {}
                    // The process closed its stdin or exited: further input has nowhere to go.
                    Err(e) if e.kind() == io::ErrorKind::BrokenPipe => stdin = Sink::Pipe(None),
                    Err(e) => {
                        crate::warn!("exec {pid}: writing stdin failed: {e}");
                        stdin = Sink::Pipe(None);
                    }
                }
            }
        });

        let status = tokio::select! {
            status = &mut exit => status.ok(),
            () = events.closed() => {
                crate::info!("exec {pid}: client gone, killing its process group");
                let _ = reaper.kill(pid, Signal::SIGKILL, true);
                exit.await.ok()
            }
        };
        let _ = exited_tx.send(true);
        let mut ends = vec![out_pump.await.unwrap_or(PumpEnd::Eof)];
        if let Some(err_pump) = err_pump {
            ends.push(err_pump.await.unwrap_or(PumpEnd::Eof));
        }
        stdin_task.abort();
        if ends.contains(&PumpEnd::Abandoned) {
            crate::info!(
                "exec {pid}: output still open after exit (background process), not waiting for it"
            );
        }
        if let Some(status) = status {
            let _ = events.send(map(Event::Exit(status))).await;
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use accordion_proto::agent::v1::ExecStart;

    fn spec(script: &str) -> ExecSpec {
        ExecSpec {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec![],
            cwd: "/".into(),
            tty: false,
        }
    }

    /// Runs to completion, returns (stdout, stderr, exit).
    async fn run(spec: ExecSpec, input: Vec<Input>) -> (Vec<u8>, Vec<u8>, Option<ExitStatus>) {
        let reaper = Reaper::global().expect("reaper");
        let running = start(&reaper, &spec).expect("start");
        let (in_tx, in_rx) = mpsc::channel(4);
        let (ev_tx, mut ev_rx) = mpsc::channel(4);
        let task = tokio::spawn(running.run(in_rx, ev_tx, |e| e));
        for item in input {
            in_tx.send(item).await.expect("input");
        }
        let (mut out, mut err, mut exit) = (Vec::new(), Vec::new(), None);
        while let Some(event) = ev_rx.recv().await {
            match event {
                Event::Stdout(b) => out.extend(b),
                Event::Stderr(b) => err.extend(b),
                Event::Exit(s) => exit = Some(s),
            }
        }
        assert_eq!(task.await.expect("join"), exit);
        (out, err, exit)
    }

    #[test]
    fn test_spec_from_wire_rejects_empty_argv() {
        let err = ExecSpec::try_from(ExecStart::default()).expect_err("empty argv");
        assert!(matches!(err, ExecError::InvalidArgument(_)));
    }

    #[test]
    fn test_spec_from_wire_rejects_env_without_equals() {
        let start = ExecStart {
            argv: vec!["true".into()],
            env: vec!["NOPE".into()],
            ..Default::default()
        };
        assert!(matches!(
            ExecSpec::try_from(start),
            Err(ExecError::InvalidArgument(_))
        ));
    }

    #[test]
    fn test_spec_from_wire_splits_env_at_first_equals_and_defaults_cwd() {
        let start = ExecStart {
            argv: vec!["true".into()],
            env: vec!["A=b=c".into()],
            ..Default::default()
        };
        let spec = ExecSpec::try_from(start).expect("valid");
        assert_eq!(spec.env, vec![("A".to_owned(), "b=c".to_owned())]);
        assert_eq!(spec.cwd, PathBuf::from("/"));
    }

    #[tokio::test]
    async fn test_run_separates_stdout_and_stderr() {
        let (out, err, exit) = run(spec("echo out; echo err >&2; exit 5"), vec![]).await;
        assert_eq!(
            (out.as_slice(), err.as_slice(), exit),
            (&b"out\n"[..], &b"err\n"[..], Some(ExitStatus::Exited(5)))
        );
    }

    #[tokio::test]
    async fn test_run_pipes_stdin_until_closed() {
        let input = vec![
            Input::Stdin(b"hello ".to_vec()),
            Input::Stdin(b"world".to_vec()),
            Input::CloseStdin,
        ];
        let (out, _, exit) = run(spec("cat"), input).await;
        assert_eq!(
            (out.as_slice(), exit),
            (&b"hello world"[..], Some(ExitStatus::Exited(0)))
        );
    }

    #[tokio::test]
    async fn test_run_env_replaces_agent_env_and_keeps_default_path() {
        let mut s = spec("echo \"$FOO:$PATH:${HOME-unset}\"");
        s.env = vec![("FOO".into(), "bar".into())];
        let (out, _, _) = run(s, vec![]).await;
        assert_eq!(
            String::from_utf8_lossy(&out),
            format!("bar:{DEFAULT_PATH}:unset\n")
        );
    }

    #[tokio::test]
    async fn test_run_background_grandchild_does_not_hold_exit() {
        let started = std::time::Instant::now();
        let (out, _, exit) = run(spec("sleep 30 & echo bg"), vec![]).await;
        assert_eq!(
            (out.as_slice(), exit),
            (&b"bg\n"[..], Some(ExitStatus::Exited(0)))
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn test_run_tty_merges_output_on_a_terminal() {
        let mut s = spec("test -t 0 && test -t 1 && echo tty; echo err >&2");
        s.tty = true;
        let (out, err, exit) = run(s, vec![]).await;
        // A terminal translates "\n" to "\r\n" on output.
        assert_eq!(
            (out.as_slice(), err.as_slice(), exit),
            (
                &b"tty\r\nerr\r\n"[..],
                &b""[..],
                Some(ExitStatus::Exited(0))
            )
        );
    }

    #[tokio::test]
    async fn test_run_abort_kills_process_group() {
        let reaper = Reaper::global().expect("reaper");
        let running = start(&reaper, &spec("sleep 30")).expect("start");
        let (in_tx, in_rx) = mpsc::channel(1);
        let (ev_tx, mut ev_rx) = mpsc::channel(4);
        let task = tokio::spawn(running.run(in_rx, ev_tx, |e| e));
        in_tx.send(Input::Abort).await.expect("abort");
        assert_eq!(
            ev_rx.recv().await,
            Some(Event::Exit(ExitStatus::Signaled(libc::SIGKILL)))
        );
        assert_eq!(
            task.await.expect("join"),
            Some(ExitStatus::Signaled(libc::SIGKILL))
        );
    }

    #[tokio::test]
    async fn test_start_missing_program_is_not_found() {
        let reaper = Reaper::global().expect("reaper");
        let mut s = spec("");
        s.argv = vec!["accordion-no-such-program".into()];
        assert!(
            matches!(start(&reaper, &s), Err(ExecError::NotFound(p)) if p == "accordion-no-such-program")
        );
    }

    #[test]
    fn test_resolve_program_searches_path_in_order() {
        assert_eq!(
            resolve_program("sh", "/nonexistent:/bin:/usr/bin").expect("sh"),
            PathBuf::from("/bin/sh")
        );
        assert!(
            matches!(
                resolve_program("/etc/passwd", DEFAULT_PATH),
                Err(ExecError::NotFound(_))
            ),
            "not executable"
        );
    }
}
