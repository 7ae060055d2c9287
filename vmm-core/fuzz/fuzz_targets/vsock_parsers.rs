//! The vsock parsers a peer controls: the 44-byte packet header (the guest) and the hybrid-vsock
//! `CONNECT <port>` line (a host process). Both are total: any bytes give a value or a refusal,
//! never a panic.
#![no_main]

use accordion_vmm::devices::fuzzing::{parse_connect_line, LineReader, Progress};
use accordion_vmm::devices::virtio::vsock::packet::{Header, HEADER_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Every 44 bytes are a header, and it encodes back to the same bytes.
    if let Some(raw) = data.first_chunk::<HEADER_SIZE>() {
        assert_eq!(&Header::parse(raw).to_bytes(), raw);
    }

    // A port comes only from `CONNECT <decimal digits>`, and it is their value.
    if let Some(port) = parse_connect_line(data) {
        let line = data.strip_suffix(b"\r").unwrap_or(data);
        let digits = line
            .strip_prefix(b"CONNECT ")
            .expect("accepted without the prefix");
        assert!(digits.iter().all(u8::is_ascii_digit));
        assert_eq!(
            std::str::from_utf8(digits)
                .ok()
                .and_then(|d| d.parse().ok()),
            Some(port)
        );
    }

    // Reading a line from a stream stops at the first newline and leaves the rest unread.
    let mut stream = data;
    match LineReader::default().read_from(&mut stream) {
        Progress::Port(port) => {
            let newline = data
                .iter()
                .position(|&b| b == b'\n')
                .expect("a line without newline");
            assert_eq!(parse_connect_line(&data[..newline]), Some(port));
            assert_eq!(stream, &data[newline + 1..]);
        }
        // A slice never blocks: it ends (EOF) instead.
        Progress::Pending => panic!("a slice reported WouldBlock"),
        Progress::Refused => {}
    }
});
