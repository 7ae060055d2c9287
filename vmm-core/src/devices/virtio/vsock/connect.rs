//! The hybrid-vsock handshake on a host connection (Firecracker's convention): the host process
//! writes `CONNECT <port>\n`; once the guest accepts, the VMM answers `OK <host port>\n` and the
//! socket carries the stream from the next byte on.

use std::io::{ErrorKind, Read};

/// Longest `CONNECT <port>` line accepted, without its newline.
pub const MAX_LINE: usize = 32;
/// Longest `OK <port>\n` reply: `OK 4294967295\n`.
pub const MAX_REPLY: usize = 14;

/// Where reading a `CONNECT` line stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The line is not complete yet.
    Pending,
    /// The host asks for this guest port.
    Port(u32),
    /// Malformed, too long, or the host hung up: close the connection.
    Refused,
}

/// The bytes of a `CONNECT` line read so far.
#[derive(Debug, Default)]
pub struct LineReader {
    line: [u8; MAX_LINE],
    len: usize,
}

impl LineReader {
    /// Reads from `stream` until the newline, the line's bound, or `WouldBlock`. One byte at a
    /// time: whatever follows the newline belongs to the stream and stays in the socket.
    pub fn read_from(&mut self, stream: &mut impl Read) -> Progress {
        let mut byte = [0u8];
        loop {
            match stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => {
                    return parse_connect_line(&self.line[..self.len])
                        .map_or(Progress::Refused, Progress::Port);
                }
                Ok(1) if self.len < MAX_LINE => {
                    self.line[self.len] = byte[0];
                    self.len += 1;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Progress::Pending,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // EOF, an error, or a line past its bound.
                _ => return Progress::Refused,
            }
        }
    }

    /// The line so far, for a log message.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.line[..self.len]).into_owned()
    }
}

/// The port in a `CONNECT <port>` line (without its newline; a trailing `\r` is allowed).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.strip_prefix(b"CONNECT ")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// `OK <port>\n`.
pub fn reply(port: u32) -> Vec<u8> {
    let mut line = Vec::with_capacity(MAX_REPLY);
    line.extend_from_slice(format!("OK {port}\n").as_bytes());
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_connect_line_yields_its_port() {
        assert_eq!(parse_connect_line(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect_line(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295"), Some(u32::MAX));
    }

    #[test]
    fn test_malformed_connect_lines_are_refused() {
        for bad in [
            &b"connect 1024"[..],
            b"CONNECT -1",
            b"CONNECT +1",
            b"CONNECT 4294967296",
            b"CONNECT",
            b"CONNECT ",
            b"CONNECT 1 ",
            b"CONNECT \xff",
        ] {
            assert_eq!(parse_connect_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn test_reader_stops_at_the_newline_and_leaves_the_rest() {
        let mut input: &[u8] = b"CONNECT 7\nstream bytes";
        let progress = LineReader::default().read_from(&mut input);
        assert_eq!(progress, Progress::Port(7));
        assert_eq!(input, b"stream bytes");
    }

    #[test]
    fn test_reader_refuses_a_line_past_its_bound_or_eof() {
        let long = [b'1'; MAX_LINE + 1];
        let mut eof: &[u8] = b"CONNECT 7";
        assert_eq!(
            LineReader::default().read_from(&mut &long[..]),
            Progress::Refused
        );
        assert_eq!(LineReader::default().read_from(&mut eof), Progress::Refused);
    }

    #[test]
    fn test_reply_fits_its_bound() {
        assert_eq!(reply(u32::MAX).len(), MAX_REPLY);
        assert_eq!(reply(1 << 30), b"OK 1073741824\n");
    }
}
