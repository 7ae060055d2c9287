//! containerd's side of a process's stdio: the paths in CreateTask / Exec requests (FIFOs
//! containerd or `ctr` reads and writes, or `file://` logs), bridged to the agent's streams.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// A boxed output stream.
pub type Output = Pin<Box<dyn AsyncWrite + Send>>;

/// Opens an output destination: a FIFO path, `fifo://` or `file://` (appended), or nothing.
pub async fn open_output(uri: &str) -> io::Result<Output> {
    if uri.is_empty() {
        return Ok(Box::pin(tokio::io::sink()));
    }
    if let Some(path) = uri.strip_prefix("file://") {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await?;
        return Ok(Box::pin(file));
    }
    if uri.starts_with("binary://") {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("{uri}: binary:// log drivers are not supported by accordion"),
        ));
    }
    let path = uri.strip_prefix("fifo://").unwrap_or(uri);
    // Read-write, as containerd's own shims keep a read end: the FIFO stays valid while
    // containerd restarts and reopens it.
    let sender = pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(path)?;
    Ok(Box::pin(sender))
}

/// A process's stdin: the agent reads `reader`; EOF comes when the client closes its end of the
/// FIFO, or with CloseIO.
pub struct Stdin {
    pub reader: DuplexStream,
    pub closer: StdinCloser,
}

/// Ends a [`Stdin`] once what the client already wrote has been passed on.
pub struct StdinCloser {
    close: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    path: PathBuf,
}

impl StdinCloser {
    /// Passes on what the client wrote so far, then gives the process EOF.
    pub fn close(&mut self) {
        if let Some(close) = self.close.take() {
            let _ = close.send(());
        }
        unblock_reader(&self.path);
    }
}

impl Drop for StdinCloser {
    fn drop(&mut self) {
        self.task.abort();
        unblock_reader(&self.path);
    }
}

/// A reader thread blocked opening the FIFO (no client ever opened it) returns once a writer
/// comes and goes: be that writer.
fn unblock_reader(path: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path);
}

const CHUNK: usize = 32 * 1024;
/// After CloseIO, how long data the reader thread is still passing on may take.
const CLOSE_DRAIN: Duration = Duration::from_millis(50);

/// Opens containerd's stdin FIFO (`None` when the process has no stdin).
pub fn open_stdin(uri: &str) -> io::Result<Option<Stdin>> {
    if uri.is_empty() {
        return Ok(None);
    }
    let path = PathBuf::from(uri.strip_prefix("fifo://").unwrap_or(uri));
    if !path.exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("stdin {} does not exist", path.display()),
        ));
    }
    // A blocking read-only open, as containerd's own shims do: it waits for the client to open
    // its end, and reads see EOF when the client closes it (`ctr run` closes stdin that way; CRI
    // clients call CloseIO). A thread, because tokio's FIFO receiver sees EOF whenever no writer
    // is connected yet.
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(16);
    let fifo = path.clone();
    std::thread::Builder::new()
        .name("stdin-fifo".into())
        .spawn(move || {
            let Ok(mut file) = std::fs::File::open(&fifo) else {
                return;
            };
            let mut buf = vec![0u8; CHUNK];
            loop {
                match file.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        if tx.blocking_send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        })?;
    let (reader, mut writer) = tokio::io::duplex(CHUNK * 2);
    let (close, mut closed) = oneshot::channel();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                biased;
                chunk = rx.recv() => match chunk {
                    Some(data) => {
                        if writer.write_all(&data).await.is_err() {
                            return;
                        }
                    }
                    None => break,
                },
                _ = &mut closed => {
                    while let Ok(Some(data)) = tokio::time::timeout(CLOSE_DRAIN, rx.recv()).await {
                        if writer.write_all(&data).await.is_err() {
                            return;
                        }
                    }
                    break;
                }
            }
        }
        let _ = writer.shutdown().await;
    });
    Ok(Some(Stdin {
        reader,
        closer: StdinCloser {
            close: Some(close),
            task,
            path,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn fifo(name: &str) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("accordion-stdio-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        path
    }

    #[tokio::test]
    async fn test_stdin_passes_queued_data_before_eof_on_close() {
        let path = fifo("stdin");
        let mut stdin = open_stdin(path.to_str().unwrap()).unwrap().unwrap();
        {
            let mut w = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            std::io::Write::write_all(&mut w, b"hello\n").unwrap();
        }
        stdin.closer.close();
        let mut got = Vec::new();
        stdin.reader.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello\n");
        std::fs::remove_file(&path).unwrap();
    }

    #[tokio::test]
    async fn test_stdin_ends_when_the_client_closes_its_end() {
        let path = fifo("stdin-eof");
        let mut stdin = open_stdin(path.to_str().unwrap()).unwrap().unwrap();
        {
            let mut w = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            std::io::Write::write_all(&mut w, b"abc").unwrap();
        }
        let mut got = Vec::new();
        stdin.reader.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"abc");
        std::fs::remove_file(&path).unwrap();
    }

    #[tokio::test]
    async fn test_close_without_a_client_ends_stdin() {
        let path = fifo("stdin-none");
        let mut stdin = open_stdin(path.to_str().unwrap()).unwrap().unwrap();
        stdin.closer.close();
        let mut got = Vec::new();
        stdin.reader.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty());
        std::fs::remove_file(&path).unwrap();
    }

    #[tokio::test]
    async fn test_output_to_file_uri_appends_and_binary_is_refused() {
        let path = std::env::temp_dir().join(format!("accordion-stdio-{}-log", std::process::id()));
        std::fs::write(&path, b"a").unwrap();
        let mut out = open_output(&format!("file://{}", path.display()))
            .await
            .unwrap();
        out.write_all(b"b").await.unwrap();
        out.flush().await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"ab");
        std::fs::remove_file(&path).unwrap();
        assert!(open_output("binary:///usr/bin/logger").await.is_err());
        assert!(open_stdin("/nonexistent/fifo").is_err());
    }
}
