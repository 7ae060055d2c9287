//! The guest half of the vsock tests; runs inside a guest, not on the host.
//!
//! vsock_peer listen PORT          accept one connection, read a line, answer "echo: <line>"
//! vsock_peer connect CID PORT MSG connect, send "MSG\n", print the line that comes back

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::FromRawFd;
use std::process::ExitCode;

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is a plain C struct for which all-zero bytes are valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn check(rc: libc::c_int, what: &str) -> Result<libc::c_int, String> {
    if rc < 0 {
        Err(format!("{what}: {}", std::io::Error::last_os_error()))
    } else {
        Ok(rc)
    }
}

fn socket() -> Result<libc::c_int, String> {
    // SAFETY: plain socket(2) call with constant arguments.
    check(
        unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) },
        "socket",
    )
}

fn addr_len() -> libc::socklen_t {
    std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t
}

/// Takes ownership of a connected socket fd.
fn into_file(fd: libc::c_int) -> File {
    // SAFETY: `fd` is a socket this process just created or accepted and owns exclusively.
    unsafe { File::from_raw_fd(fd) }
}

fn listen(port: u32) -> Result<(), String> {
    let fd = socket()?;
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: `addr` is a valid sockaddr_vm of the length passed; `fd` is our socket.
    let rc = unsafe { libc::bind(fd, (&addr as *const libc::sockaddr_vm).cast(), addr_len()) };
    check(rc, "bind")?;
    // SAFETY: `fd` is a bound socket.
    check(unsafe { libc::listen(fd, 1) }, "listen")?;
    println!("vsock_peer: listening on {port}");
    // SAFETY: `fd` is listening; null address pointers are allowed.
    let conn = check(
        unsafe { libc::accept(fd, std::ptr::null_mut(), std::ptr::null_mut()) },
        "accept",
    )?;
    let mut stream = into_file(conn);
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(|e| format!("read: {e}"))?;
    stream
        .write_all(format!("echo: {line}").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    println!("vsock_peer: served {:?}", line.trim_end());
    drop(into_file(fd));
    Ok(())
}

fn connect(cid: u32, port: u32, message: &str) -> Result<(), String> {
    let fd = socket()?;
    let mut stream = into_file(fd);
    let addr = vsock_addr(cid, port);
    // SAFETY: `addr` is a valid sockaddr_vm of the length passed; `fd` is our socket.
    let rc = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_vm).cast(), addr_len()) };
    check(rc, "connect")?;
    stream
        .write_all(format!("{message}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(|e| format!("read: {e}"))?;
    println!("vsock_peer: reply={}", line.trim_end());
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |s: &String| s.parse::<u32>().map_err(|_| format!("not a number: {s}"));
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["listen", _] => number(&args[1]).and_then(listen),
        ["connect", _, _, message] => number(&args[1])
            .and_then(|cid| number(&args[2]).and_then(|port| connect(cid, port, message))),
        _ => Err("usage: vsock_peer listen PORT | connect CID PORT MESSAGE".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vsock_peer: {e}");
            ExitCode::FAILURE
        }
    }
}
