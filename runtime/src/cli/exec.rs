//! `accordion exec NAME [-t] -- cmd`: run a command in a running sandbox through its control socket.

use std::os::fd::AsFd;

use clap::Args;
use nix::sys::termios::{self, SetArg, Termios};

use crate::agent_client::ExecSpec;
use crate::control::client::ControlClient;

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// The sandbox.
    pub name: String,
    /// Run on a pseudo-terminal in the guest (output arrives as one stream); puts this terminal
    /// in raw mode while the command runs.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Extra environment entries, KEY=VALUE (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory in the guest.
    #[arg(short = 'w', long, default_value = "/")]
    pub workdir: String,
    /// The command.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

pub async fn run(args: ExecArgs) -> i32 {
    if let Some(bad) = args.env.iter().find(|e| !e.contains('=')) {
        eprintln!("accordion exec: --env {bad:?} is not KEY=VALUE");
        return 125;
    }
    let client = match ControlClient::connect_to(&args.name).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("accordion exec: {}", super::error_chain(&e));
            return 125;
        }
    };
    let mut env = super::default_env();
    env.extend(args.env.iter().cloned());
    let stdin = std::io::stdin();
    let local_tty = args.tty && termios::tcgetattr(stdin.as_fd()).is_ok();
    let spec = ExecSpec {
        argv: args.command.clone(),
        env,
        cwd: args.workdir.clone(),
        tty: args.tty,
        tty_size: if local_tty { terminal_size() } else { None },
        ..ExecSpec::default()
    };
    // Raw mode so keys (^C, ^D) reach the guest's terminal, restored however we leave.
    let _raw = if local_tty { RawMode::enter() } else { None };
    let result = client
        .exec(
            spec,
            Some(tokio::io::stdin()),
            tokio::io::stdout(),
            tokio::io::stderr(),
        )
        .await;
    drop(_raw);
    match result {
        Ok(status) => status.shell_code(),
        Err(e) => {
            eprintln!("accordion exec: {}", super::error_chain(&e));
            125
        }
    }
}

/// This terminal's (rows, cols), from `stty size`-equivalent ioctl on stdout.
fn terminal_size() -> Option<(u32, u32)> {
    nix::ioctl_read_bad!(get_winsize, nix::libc::TIOCGWINSZ, nix::libc::winsize);
    let mut size = nix::libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into `size`, which lives across the call.
    unsafe { get_winsize(nix::libc::STDIN_FILENO, &mut size) }.ok()?;
    (size.ws_row > 0 && size.ws_col > 0).then(|| (u32::from(size.ws_row), u32::from(size.ws_col)))
}

/// The local terminal in raw mode until dropped.
struct RawMode(Termios);

impl RawMode {
    fn enter() -> Option<Self> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(Self(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.0);
    }
}
