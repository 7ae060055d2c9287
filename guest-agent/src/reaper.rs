//! The only place that calls `waitpid`.
//!
//! As PID 1 the agent inherits every orphan in the guest and must reap them, so it waits for *any*
//! child (`waitpid(-1)`). A second waiter for specific pids (tokio::process, `Child::wait`) would race
//! with that: whichever waits first takes the exit status, and an exec could lose its own. So there
//! is one reaper, and execs don't wait: they register their pid and receive the status from it.
//!
//! The race between a fast-exiting child and its registration is closed by a lock: a child is
//! spawned *and* registered while holding the waiter table, and the reaper reaps only while holding
//! it. The same lock makes signalling safe: a registered pid has not been reaped, so it cannot
//! have been reused by another process. It also keeps std's own `waitpid` (on a failed `execve`
//! inside `Command::spawn`) from being robbed, which would make std panic.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use nix::errno::Errno;
use nix::sys::signal::{self, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal as unix_signal, Signal as SignalStream, SignalKind};
use tokio::sync::oneshot;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It called exit with this code.
    Exited(i32),
    /// This signal killed it.
    Signaled(i32),
}

/// Errors of the reaper.
#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    /// SIGCHLD could not be subscribed to.
    #[error("Cannot watch SIGCHLD")]
    Signal(#[source] io::Error),
    /// The reaper thread could not be started.
    #[error("Cannot start the reaper thread")]
    Thread(#[source] io::Error),
    /// The process could not be started.
    #[error("Cannot start {program:?}")]
    Spawn {
        /// argv[0].
        program: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The pid is not a running child of ours (it exited, or never was).
    #[error("Process {0} is not running")]
    NotRunning(u32),
    /// kill(2) failed.
    #[error("Cannot signal process {pid}")]
    Kill {
        /// Target.
        pid: u32,
        /// Why.
        #[source]
        source: Errno,
    },
}

/// Handle to the reaper; cheap to clone.
#[derive(Clone, Debug)]
pub struct Reaper {
    waiters: Arc<Mutex<Waiters>>,
}

#[derive(Debug, Default)]
struct Waiters {
    by_pid: HashMap<i32, oneshot::Sender<ExitStatus>>,
    /// Orphans reaped so far: reported in logs, useful in tests.
    orphans_reaped: u64,
}

/// A process started through the reaper.
#[derive(Debug)]
pub struct Spawned {
    /// The std handle, for its stdio pipes. Never wait on it: the reaper owns the exit status.
    pub child: Child,
    /// Its pid.
    pub pid: u32,
    /// Resolves once the reaper has collected the exit status.
    pub exit: oneshot::Receiver<ExitStatus>,
}

impl Reaper {
    /// The process's reaper, started on first use on its own thread (see the module docs: there
    /// must be exactly one `waitpid(-1)` caller per process, so there is exactly one `Reaper`).
    pub fn global() -> Result<Self, ReaperError> {
        static GLOBAL: Mutex<Option<Reaper>> = Mutex::new(None);
        let mut global = GLOBAL.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(reaper) = global.as_ref() {
            return Ok(reaper.clone());
        }
        let reaper = Reaper {
            waiters: Arc::default(),
        };
        let task = reaper.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        // Its own thread and runtime: the reaper outlives whichever runtime asked for it first
        // (each unit test has its own), and reaping never waits behind gRPC work.
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || task.run(&ready_tx))
            .map_err(ReaperError::Thread)?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(ReaperError::Signal(e)),
            Err(_) => return Err(ReaperError::Signal(io::Error::other("reaper thread ended"))),
        }
        *global = Some(reaper.clone());
        Ok(reaper)
    }

    fn run(&self, ready: &std::sync::mpsc::Sender<io::Result<()>>) {
        let subscribed = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            // Subscribe before anyone can spawn through us so no SIGCHLD is missed.
            .and_then(|rt| unix_signal_in(&rt).map(|sig| (rt, sig)));
        let (rt, mut sigchld) = match subscribed {
            Ok(ok) => ok,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        rt.block_on(async {
            // Children that died before we subscribed (possible for PID 1 in an initramfs).
            self.reap_all();
            // SIGCHLD coalesces; reap_all drains every zombie on each delivery.
            while sigchld.recv().await.is_some() {
                self.reap_all();
            }
        });
    }

    fn lock(&self) -> MutexGuard<'_, Waiters> {
        // A panic while holding the lock can't leave the table half-updated (single inserts and
        // removes), so a poisoned lock is still usable.
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Spawns `cmd` and registers it for its exit status (see the module docs for why both happen
    /// under the lock).
    pub fn spawn(&self, cmd: &mut Command) -> Result<Spawned, ReaperError> {
        let mut waiters = self.lock();
        let child = cmd.spawn().map_err(|source| ReaperError::Spawn {
            program: cmd.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        let pid = child.id();
        let (tx, exit) = oneshot::channel();
        // A pid fits in i32 (pid_t); `Child::id` widened it to u32.
        waiters.by_pid.insert(pid as i32, tx);
        Ok(Spawned { child, pid, exit })
    }

    /// Runs `start`, which creates processes some other way than `Command` (libcontainer clones its
    /// container processes itself), and registers the pid it returns, all under the waiter table's
    /// lock: the process cannot be reaped as an orphan before it is registered, and the helper
    /// processes `start` waits for itself (libcontainer's intermediate process) are not taken
    /// from it meanwhile. `start` must not call back into the reaper.
    pub fn start_with<T, E>(
        &self,
        start: impl FnOnce() -> Result<(i32, T), E>,
    ) -> Result<(T, oneshot::Receiver<ExitStatus>), E> {
        let mut waiters = self.lock();
        let (pid, value) = start()?;
        let (tx, exit) = oneshot::channel();
        waiters.by_pid.insert(pid, tx);
        Ok((value, exit))
    }

    /// Sends `sig` to `pid` if it is a registered, not yet reaped child. With `group`, to its whole
    /// process group (the exec's children too).
    pub fn kill(&self, pid: u32, sig: Signal, group: bool) -> Result<(), ReaperError> {
        let waiters = self.lock();
        let raw = pid as i32;
        if !waiters.by_pid.contains_key(&raw) {
            return Err(ReaperError::NotRunning(pid));
        }
        let target = if group {
            Pid::from_raw(-raw)
        } else {
            Pid::from_raw(raw)
        };
        signal::kill(target, sig).map_err(|source| ReaperError::Kill { pid, source })
    }

    /// Number of reaped processes nobody was waiting for.
    pub fn orphans_reaped(&self) -> u64 {
        self.lock().orphans_reaped
    }

    fn reap_all(&self) {
        let mut waiters = self.lock();
        loop {
            let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Exited(code)),
                Ok(WaitStatus::Signaled(pid, sig, _core)) => {
                    (pid, ExitStatus::Signaled(sig as i32))
                }
                // Nothing left to reap right now.
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                // Stop/continue notifications (not requested, but harmless).
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    crate::warn!("waitpid failed: {e}");
                    return;
                }
            };
            match waiters.by_pid.remove(&pid.as_raw()) {
                // The exec may have gone away (client disconnected); nothing to tell then.
                Some(tx) => drop(tx.send(status)),
                None => waiters.orphans_reaped += 1,
            }
        }
    }
}

fn unix_signal_in(rt: &tokio::runtime::Runtime) -> io::Result<SignalStream> {
    let _guard = rt.enter();
    unix_signal(SignalKind::child())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        cmd
    }

    #[tokio::test]
    async fn test_spawn_exit_code_delivered() {
        let reaper = Reaper::global().expect("reaper");
        let spawned = reaper.spawn(&mut sh("exit 7")).expect("spawn");
        assert_eq!(spawned.exit.await.expect("status"), ExitStatus::Exited(7));
    }

    #[tokio::test]
    async fn test_spawn_killed_reports_signal() {
        let reaper = Reaper::global().expect("reaper");
        let spawned = reaper.spawn(&mut sh("kill -9 $$")).expect("spawn");
        assert_eq!(spawned.exit.await.expect("status"), ExitStatus::Signaled(9));
    }

    #[tokio::test]
    async fn test_spawn_missing_program_is_error_not_panic() {
        // std waits for a child whose execve failed; the lock keeps the reaper from taking that
        // status first (which would make std panic). Under qemu-user, posix_spawn cannot report
        // the failure, and the child exits 127 instead: both are a clean outcome.
        let reaper = Reaper::global().expect("reaper");
        match reaper.spawn(&mut Command::new("/nonexistent/accordion-test")) {
            Err(err) => assert!(matches!(err, ReaperError::Spawn { .. }), "{err:?}"),
            Ok(spawned) => assert_eq!(spawned.exit.await.expect("status"), ExitStatus::Exited(127)),
        }
    }

    #[tokio::test]
    async fn test_kill_after_exit_is_not_running() {
        let reaper = Reaper::global().expect("reaper");
        let spawned = reaper.spawn(&mut sh("exit 0")).expect("spawn");
        let pid = spawned.pid;
        spawned.exit.await.expect("status");
        let err = reaper.kill(pid, Signal::SIGTERM, false).expect_err("kill");
        assert!(
            matches!(err, ReaperError::NotRunning(p) if p == pid),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn test_start_with_registers_pid_from_closure() {
        let reaper = Reaper::global().expect("reaper");
        let (child, exit) = reaper
            .start_with(|| {
                let child = sh("exit 5").spawn()?;
                Ok::<_, io::Error>((child.id() as i32, child))
            })
            .expect("start");
        drop(child);
        assert_eq!(exit.await.expect("status"), ExitStatus::Exited(5));
    }

    #[tokio::test]
    async fn test_grandchild_reaped_as_orphan_without_stealing() {
        // The shell's own child is reaped by the shell; only sh itself is ours here, and it must
        // reach its waiter even though the reaper waits for any pid.
        let reaper = Reaper::global().expect("reaper");
        let spawned = reaper
            .spawn(&mut sh("sleep 0.01 & wait; exit 3"))
            .expect("spawn");
        assert_eq!(spawned.exit.await.expect("status"), ExitStatus::Exited(3));
    }
}
