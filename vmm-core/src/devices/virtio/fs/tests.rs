use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Instant;

use super::*;
use crate::devices::irq::IrqLine;
use crate::devices::virtio::{INTERRUPT_CONFIG, INTERRUPT_USED_RING};

fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "accordion-fs-unit-{}-{name}.sock",
        std::process::id()
    ))
}

/// Polls `cond` for up to 5 s.
fn eventually(cond: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn interrupt() -> (Arc<VirtioInterrupt>, IrqLine) {
    let line = IrqLine::new(17).unwrap();
    let observer = line.try_clone().unwrap();
    (Arc::new(VirtioInterrupt::new(line)), observer)
}

#[test]
fn test_encode_tag_pads_with_nul() {
    let tag = encode_tag("rootfs").unwrap();
    assert_eq!(&tag[..6], b"rootfs");
    assert!(tag[6..].iter().all(|&b| b == 0));
}

#[test]
fn test_encode_tag_accepts_exactly_36_bytes_and_refuses_more_empty_or_nul() {
    assert!(encode_tag(&"a".repeat(36)).is_ok());
    assert!(matches!(encode_tag(&"a".repeat(37)), Err(FsError::Tag(_))));
    assert!(matches!(encode_tag(""), Err(FsError::Tag(_))));
    assert!(matches!(encode_tag("a\0b"), Err(FsError::Tag(_))));
}

#[test]
fn test_connect_to_missing_socket_names_it() {
    let path = socket_path("missing");
    let err = Fs::connect("share", &path).err().unwrap();
    assert!(matches!(&err, FsError::Connect(p, _) if *p == path));
    assert!(err.to_string().contains(path.to_str().unwrap()));
}

#[test]
fn test_connect_to_a_peer_that_hangs_up_fails_in_the_handshake() {
    let path = socket_path("hangup");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let peer = std::thread::spawn(move || drop(listener.accept().unwrap()));
    let result = Fs::connect("share", &path);
    peer.join().unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(matches!(result, Err(FsError::Request(_, _))));
}

#[test]
fn test_from_stream_speaks_vhost_user_on_the_given_connection() {
    let (stream, peer) = UnixStream::pair().unwrap();
    drop(peer);
    let path = Path::new("/jail/has/no/virtiofsd.sock");
    let result = Fs::from_stream("share", stream, path);
    // No connect(2): the handshake itself fails on the closed connection.
    assert!(matches!(result, Err(FsError::Request("SET_OWNER", _))));
}

#[test]
fn test_forwarder_turns_a_call_into_used_ring_status_and_an_edge() {
    let (interrupt, line) = interrupt();
    let calls = vec![
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    ];
    let (socket, _peer) = UnixStream::pair().unwrap();
    let failed = Arc::new(AtomicBool::new(false));
    let forwarder = interrupt::Forwarder::spawn(
        &calls,
        &socket,
        interrupt.clone(),
        failed.clone(),
        "t".into(),
    )
    .unwrap();
    calls[1].write(1).unwrap();
    let raised = eventually(|| interrupt.status() & INTERRUPT_USED_RING != 0);
    drop(forwarder);
    assert!(raised);
    assert_eq!(line.eventfd().read().unwrap(), 1);
    assert!(!failed.load(Ordering::SeqCst));
}

#[test]
fn test_forwarder_marks_the_device_failed_when_the_backend_hangs_up() {
    let (interrupt, _line) = interrupt();
    let (socket, peer) = UnixStream::pair().unwrap();
    let failed = Arc::new(AtomicBool::new(false));
    let forwarder =
        interrupt::Forwarder::spawn(&[], &socket, interrupt.clone(), failed.clone(), "t".into())
            .unwrap();
    drop(peer);
    let noticed = eventually(|| failed.load(Ordering::SeqCst));
    drop(forwarder);
    assert!(noticed);
    assert!(interrupt.needs_reset());
    assert_eq!(interrupt.status(), INTERRUPT_CONFIG);
}
