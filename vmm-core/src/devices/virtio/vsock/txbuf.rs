//! Guest → host bytes a connection's socket has not taken yet: a ring of fixed capacity, so what
//! the guest can park in the VMM is bounded by the credit it was given, not by what it sends.
//!
//! The ring's memory is allocated on first use: most connections never fill their socket.

use std::io::{ErrorKind, Write};

use vm_memory::VolatileSlice;

/// The ring would overflow: the guest sent beyond its credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("connection buffer full")]
pub struct Full;

/// A byte ring of `capacity` bytes.
#[derive(Debug)]
pub struct TxBuf {
    data: Option<Box<[u8]>>,
    capacity: usize,
    /// Offset of the oldest byte.
    head: usize,
    len: usize,
}

impl TxBuf {
    /// An empty ring that will hold at most `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Self {
            data: None,
            capacity,
            head: 0,
            len: 0,
        }
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Appends all of `src` (guest memory), or nothing if it does not fit.
    pub fn push(&mut self, src: &VolatileSlice<'_>) -> Result<(), Full> {
        if src.len() > self.capacity - self.len {
            return Err(Full);
        }
        let capacity = self.capacity;
        let data = self
            .data
            .get_or_insert_with(|| vec![0u8; capacity].into_boxed_slice());
        let tail = (self.head + self.len) % capacity.max(1);
        // Up to the end of the ring, then from its start.
        let first = src.len().min(capacity - tail);
        src.copy_to(&mut data[tail..tail + first]);
        if first < src.len() {
            let rest = src.offset(first).map_err(|_| Full)?;
            rest.copy_to(&mut data[..src.len() - first]);
        }
        self.len += src.len();
        Ok(())
    }

    /// Writes what it can to `sink`; returns the bytes written. `WouldBlock` is not an error.
    pub fn flush_to(&mut self, sink: &mut impl Write) -> std::io::Result<usize> {
        let mut written = 0;
        while self.len > 0 {
            let Some(data) = self.data.as_ref() else {
                break;
            };
            let end = (self.head + self.len).min(self.capacity);
            match sink.write(&data[self.head..end]) {
                Ok(0) => break,
                Ok(n) => {
                    written += n;
                    self.len -= n;
                    self.head = (self.head + n) % self.capacity;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.len == 0 {
            self.head = 0;
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that takes at most `room` bytes, then would block.
    struct Sink {
        got: Vec<u8>,
        room: usize,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.room == 0 {
                return Err(ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.room);
            self.got.extend_from_slice(&buf[..n]);
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn push(buf: &mut TxBuf, bytes: &[u8]) -> Result<(), Full> {
        let mut copy = bytes.to_vec();
        buf.push(&VolatileSlice::from(copy.as_mut_slice()))
    }

    #[test]
    fn test_bytes_come_out_in_order_across_the_wrap() {
        let mut buf = TxBuf::new(8);
        let mut sink = Sink {
            got: Vec::new(),
            room: 5,
        };
        push(&mut buf, b"abcdef").unwrap();
        buf.flush_to(&mut sink).unwrap();
        push(&mut buf, b"ghijkl").unwrap();
        sink.room = 100;
        let n = buf.flush_to(&mut sink).unwrap();
        assert_eq!(sink.got, b"abcdefghijkl");
        assert_eq!((n, buf.len()), (7, 0));
    }

    #[test]
    fn test_a_push_beyond_capacity_is_refused_whole() {
        let mut buf = TxBuf::new(8);
        push(&mut buf, b"abcde").unwrap();
        assert_eq!(push(&mut buf, b"fghi"), Err(Full));
        assert_eq!(buf.len(), 5);
    }

    #[test]
    fn test_memory_is_allocated_on_first_push_only() {
        let mut buf = TxBuf::new(1 << 20);
        let before = buf.data.is_none();
        push(&mut buf, b"x").unwrap();
        assert!(before);
        assert_eq!(buf.data.as_ref().map(|d| d.len()), Some(1 << 20));
    }
}
