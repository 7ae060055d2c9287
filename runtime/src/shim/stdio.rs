//! containerd's side of a process's stdio: the paths in CreateTask / Exec requests (FIFOs
//! containerd or `ctr` reads and writes, or `file://` logs), bridged to the agent's streams.

use std::io;
use std::path::Path;
use std::pin::Pin;

use tokio::io::{AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
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

/// A process's stdin: the agent reads `reader`; CloseIO (or the process ending) closes it.
pub struct Stdin {
    pub reader: DuplexStream,
    pub closer: StdinCloser,
}

/// Ends a [`Stdin`] once what containerd already wrote has been passed on.
pub struct StdinCloser {
    close: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl StdinCloser {
    /// Passes on what is in the FIFO now, then gives the process EOF.
    pub fn close(&mut self) {
        if let Some(close) = self.close.take() {
            let _ = close.send(());
        }
    }
}

impl Drop for StdinCloser {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const CHUNK: usize = 32 * 1024;

/// Opens containerd's stdin FIFO (`None` when the process has no stdin).
pub fn open_stdin(uri: &str) -> io::Result<Option<Stdin>> {
    if uri.is_empty() {
        return Ok(None);
    }
    let path = uri.strip_prefix("fifo://").unwrap_or(uri);
    if !Path::new(path).exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("stdin {path} does not exist"),
        ));
    }
    // Read-write: a FIFO read end sees EOF whenever no writer is connected, which happens
    // before the client opens it and across containerd restarts. EOF comes from CloseIO instead.
    let fifo = pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(path)?;
    let (reader, mut writer) = tokio::io::duplex(CHUNK * 2);
    let (close, mut closed) = oneshot::channel();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            tokio::select! {
                _ = &mut closed => break,
                ready = fifo.readable() => {
                    if ready.is_err() {
                        return;
                    }
                    match fifo.try_read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => {
                            if writer.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => return,
                    }
                }
            }
        }
        // The client wrote everything before asking to close: pass on what is still queued.
        // A plain read(2) on the non-blocking FIFO: tokio's try_read would report WouldBlock
        // until the reactor has seen the FIFO readable.
        while let Ok(n) = nix::unistd::read(&fifo, &mut buf) {
            if n == 0 || writer.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
    });
    Ok(Some(Stdin {
        reader,
        closer: StdinCloser {
            close: Some(close),
            task,
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
