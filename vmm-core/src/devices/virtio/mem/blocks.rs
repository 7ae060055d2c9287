//! The device's memory region as a map of blocks, and what each guest request does to it
//! (virtio 1.2 §5.15.6). Every address and count in a request comes from the guest: each is
//! checked against the region before a block changes state or a byte is discarded.

/// Request types (struct virtio_mem_req.type).
pub const REQ_PLUG: u16 = 0;
/// Unplug `nb_blocks` blocks at `addr`.
pub const REQ_UNPLUG: u16 = 1;
/// Unplug every block.
pub const REQ_UNPLUG_ALL: u16 = 2;
/// Report whether a range is plugged, unplugged or mixed.
pub const REQ_STATE: u16 = 3;

/// Response types (struct virtio_mem_resp.type).
pub const RESP_ACK: u16 = 0;
/// The request is valid but refused now (a plug beyond the requested size).
pub const RESP_NACK: u16 = 1;
/// The request is invalid (bad range, blocks already in the asked state, unknown type).
pub const RESP_ERROR: u16 = 3;

/// STATE answers.
pub const STATE_PLUGGED: u16 = 0;
/// Every block of the range is unplugged.
pub const STATE_UNPLUGGED: u16 = 1;
/// Some blocks are plugged, some not.
pub const STATE_MIXED: u16 = 2;

/// Bytes of struct virtio_mem_req: type, padding, then addr (le64), nb_blocks (le16), padding.
pub const REQUEST_LEN: usize = 24;
/// Bytes of struct virtio_mem_resp: type, padding, then the STATE answer (le16).
pub const RESPONSE_LEN: usize = 10;

/// A request as the guest wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// One of the `REQ_*` types (anything else is answered with an error).
    pub kind: u16,
    /// Guest physical address of the first block.
    pub addr: u64,
    /// Number of blocks.
    pub nb_blocks: u16,
}

impl Request {
    /// Decodes the little-endian request layout (padding ignored).
    pub fn parse(bytes: &[u8; REQUEST_LEN]) -> Self {
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&bytes[8..16]);
        Self {
            kind: u16_at(0),
            addr: u64::from_le_bytes(addr),
            nb_blocks: u16_at(16),
        }
    }
}

/// The device's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    /// One of the `RESP_*` types.
    pub kind: u16,
    /// For an acknowledged STATE request, one of the `STATE_*` values; otherwise 0.
    pub state: u16,
}

impl Response {
    const fn of(kind: u16) -> Self {
        Self { kind, state: 0 }
    }

    /// The little-endian response layout.
    pub fn to_bytes(self) -> [u8; RESPONSE_LEN] {
        let mut out = [0u8; RESPONSE_LEN];
        out[..2].copy_from_slice(&self.kind.to_le_bytes());
        out[8..].copy_from_slice(&self.state.to_le_bytes());
        out
    }
}

/// Frees the host memory behind a range of the region (offsets from its start).
pub trait Discard {
    /// Gives `[offset, offset + len)` back to the host; later reads see zeros.
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()>;
}

/// Which blocks of the region are plugged, and how many the host wants.
#[derive(Debug)]
pub struct Blocks {
    base: u64,
    block_size: u64,
    count: u64,
    plugged: Vec<u64>,
    plugged_count: u64,
    requested: u64,
}

impl Blocks {
    /// A region of `count` blocks of `block_size` bytes at guest address `base`, all unplugged.
    pub fn new(base: u64, block_size: u64, count: u64) -> Self {
        Self {
            base,
            block_size,
            count,
            plugged: vec![0; usize::try_from(count.div_ceil(64)).unwrap_or(0)],
            plugged_count: 0,
            requested: 0,
        }
    }

    /// Guest address of the region.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Bytes per block.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Bytes of the region.
    pub fn region_size(&self) -> u64 {
        self.count * self.block_size
    }

    /// Bytes plugged.
    pub fn plugged_size(&self) -> u64 {
        self.plugged_count * self.block_size
    }

    /// Bytes the host asks the guest to have plugged.
    pub fn requested_size(&self) -> u64 {
        self.requested * self.block_size
    }

    /// Asks for `blocks` plugged blocks (the caller checked it against the region).
    pub fn set_requested_blocks(&mut self, blocks: u64) {
        self.requested = blocks.min(self.count);
    }

    /// Blocks in the region.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Whether `block` (an index below `count`) is plugged.
    pub fn is_plugged(&self, block: u64) -> bool {
        self.plugged[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    fn set(&mut self, block: u64, plugged: bool) {
        let (word, bit) = ((block / 64) as usize, 1u64 << (block % 64));
        if plugged {
            self.plugged[word] |= bit;
        } else {
            self.plugged[word] &= !bit;
        }
    }

    /// The first block and the block count of a request's range, if it lies inside the region
    /// on block boundaries and is not empty.
    fn range(&self, request: &Request) -> Option<(u64, u64)> {
        let offset = request.addr.checked_sub(self.base)?;
        if offset % self.block_size != 0 || request.nb_blocks == 0 {
            return None;
        }
        let first = offset / self.block_size;
        let n = u64::from(request.nb_blocks);
        (first.checked_add(n)? <= self.count).then_some((first, n))
    }

    fn plugged_in(&self, first: u64, n: u64) -> u64 {
        (first..first + n).filter(|&b| self.is_plugged(b)).count() as u64
    }

    /// Carries out `request`, discarding the memory of every block it unplugs through `discard`.
    /// A failed discard leaves those blocks plugged and answers with an error.
    pub fn handle(&mut self, request: &Request, discard: &dyn Discard) -> Response {
        match request.kind {
            REQ_PLUG => self.plug(request),
            REQ_UNPLUG => self.unplug(request, discard),
            REQ_UNPLUG_ALL => self.unplug_all(discard),
            REQ_STATE => self.state(request),
            _ => Response::of(RESP_ERROR),
        }
    }

    fn plug(&mut self, request: &Request) -> Response {
        let Some((first, n)) = self.range(request) else {
            return Response::of(RESP_ERROR);
        };
        if self.plugged_in(first, n) != 0 {
            return Response::of(RESP_ERROR);
        }
        // The guest never gets more than the host asked for.
        if self.plugged_count + n > self.requested {
            return Response::of(RESP_NACK);
        }
        (first..first + n).for_each(|b| self.set(b, true));
        self.plugged_count += n;
        Response::of(RESP_ACK)
    }

    fn unplug(&mut self, request: &Request, discard: &dyn Discard) -> Response {
        let Some((first, n)) = self.range(request) else {
            return Response::of(RESP_ERROR);
        };
        if self.plugged_in(first, n) != n {
            return Response::of(RESP_ERROR);
        }
        if let Err(e) = discard.discard(first * self.block_size, n * self.block_size) {
            crate::log_limited!(log::Level::Error, "virtio-mem: cannot discard blocks: {e}");
            return Response::of(RESP_ERROR);
        }
        (first..first + n).for_each(|b| self.set(b, false));
        self.plugged_count -= n;
        Response::of(RESP_ACK)
    }

    fn unplug_all(&mut self, discard: &dyn Discard) -> Response {
        if let Err(e) = discard.discard(0, self.region_size()) {
            crate::log_limited!(
                log::Level::Error,
                "virtio-mem: cannot discard the region: {e}"
            );
            return Response::of(RESP_ERROR);
        }
        self.plugged.fill(0);
        self.plugged_count = 0;
        Response::of(RESP_ACK)
    }

    fn state(&self, request: &Request) -> Response {
        let Some((first, n)) = self.range(request) else {
            return Response::of(RESP_ERROR);
        };
        let state = match self.plugged_in(first, n) {
            0 => STATE_UNPLUGGED,
            p if p == n => STATE_PLUGGED,
            _ => STATE_MIXED,
        };
        Response {
            kind: RESP_ACK,
            state,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    const BASE: u64 = 0x1_0000_0000;
    const BLOCK: u64 = 2 << 20;

    /// Records what was discarded; fails on demand.
    #[derive(Default)]
    struct Recorder {
        ranges: RefCell<Vec<(u64, u64)>>,
        fail: bool,
    }

    impl Discard for Recorder {
        fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
            if self.fail {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            self.ranges.borrow_mut().push((offset, len));
            Ok(())
        }
    }

    fn req(kind: u16, block: u64, nb_blocks: u16) -> Request {
        Request {
            kind,
            addr: BASE + block * BLOCK,
            nb_blocks,
        }
    }

    fn blocks(requested: u64) -> Blocks {
        let mut b = Blocks::new(BASE, BLOCK, 16);
        b.set_requested_blocks(requested);
        b
    }

    const ACK: Response = Response::of(RESP_ACK);
    const NACK: Response = Response::of(RESP_NACK);
    const ERROR: Response = Response::of(RESP_ERROR);

    #[test]
    fn test_plug_within_the_requested_size_is_acked_and_counted() {
        let (mut b, d) = (blocks(4), Recorder::default());
        assert_eq!(b.handle(&req(REQ_PLUG, 0, 3), &d), ACK);
        assert_eq!(b.plugged_size(), 3 * BLOCK);
        assert_eq!(b.handle(&req(REQ_PLUG, 8, 2), &d), NACK);
        assert_eq!(b.handle(&req(REQ_PLUG, 8, 1), &d), ACK);
        assert_eq!(b.plugged_size(), 4 * BLOCK);
    }

    #[test]
    fn test_plug_of_plugged_blocks_is_an_error_and_changes_nothing() {
        let (mut b, d) = (blocks(8), Recorder::default());
        assert_eq!(b.handle(&req(REQ_PLUG, 2, 2), &d), ACK);
        assert_eq!(b.handle(&req(REQ_PLUG, 3, 2), &d), ERROR);
        assert_eq!(b.plugged_size(), 2 * BLOCK);
        assert!(!b.is_plugged(4));
    }

    #[test]
    fn test_ranges_outside_the_region_misaligned_or_empty_are_errors() {
        let (mut b, d) = (blocks(16), Recorder::default());
        let bad = [
            Request {
                kind: REQ_PLUG,
                addr: BASE - BLOCK,
                nb_blocks: 1,
            },
            Request {
                kind: REQ_PLUG,
                addr: BASE + 1,
                nb_blocks: 1,
            },
            Request {
                kind: REQ_PLUG,
                addr: BASE + 4096,
                nb_blocks: 1,
            },
            req(REQ_PLUG, 15, 2),
            req(REQ_PLUG, 16, 1),
            req(REQ_PLUG, 0, 0),
            Request {
                kind: REQ_PLUG,
                addr: u64::MAX - BLOCK + 1,
                nb_blocks: u16::MAX,
            },
            Request {
                kind: REQ_STATE,
                addr: 0,
                nb_blocks: 1,
            },
            Request {
                kind: REQ_UNPLUG,
                addr: u64::MAX,
                nb_blocks: 1,
            },
        ];
        for r in bad {
            assert_eq!(b.handle(&r, &d), ERROR, "{r:?}");
        }
        assert_eq!(b.plugged_size(), 0);
        assert!(d.ranges.borrow().is_empty());
    }

    #[test]
    fn test_unplug_discards_exactly_the_blocks_it_unplugs() {
        let (mut b, d) = (blocks(8), Recorder::default());
        assert_eq!(b.handle(&req(REQ_PLUG, 4, 4), &d), ACK);
        assert_eq!(b.handle(&req(REQ_UNPLUG, 5, 2), &d), ACK);
        assert_eq!(*d.ranges.borrow(), [(5 * BLOCK, 2 * BLOCK)]);
        assert_eq!(b.plugged_size(), 2 * BLOCK);
        // Blocks 5 and 6 are no longer plugged: unplugging them again is an error.
        assert_eq!(b.handle(&req(REQ_UNPLUG, 4, 2), &d), ERROR);
        assert_eq!(d.ranges.borrow().len(), 1);
    }

    #[test]
    fn test_a_failed_discard_keeps_the_blocks_plugged() {
        let mut b = blocks(8);
        assert_eq!(b.handle(&req(REQ_PLUG, 0, 2), &Recorder::default()), ACK);
        let failing = Recorder {
            fail: true,
            ..Recorder::default()
        };
        assert_eq!(b.handle(&req(REQ_UNPLUG, 0, 2), &failing), ERROR);
        assert_eq!(b.handle(&req(REQ_UNPLUG_ALL, 0, 0), &failing), ERROR);
        assert_eq!(b.plugged_size(), 2 * BLOCK);
    }

    #[test]
    fn test_unplug_all_discards_the_region_and_ignores_the_range() {
        let (mut b, d) = (blocks(8), Recorder::default());
        assert_eq!(b.handle(&req(REQ_PLUG, 1, 8), &d), ACK);
        let anything = Request {
            kind: REQ_UNPLUG_ALL,
            addr: 7,
            nb_blocks: 9,
        };
        assert_eq!(b.handle(&anything, &d), ACK);
        assert_eq!(*d.ranges.borrow(), [(0, 16 * BLOCK)]);
        assert_eq!(b.plugged_size(), 0);
    }

    #[test]
    fn test_state_reports_plugged_unplugged_and_mixed() {
        let (mut b, d) = (blocks(8), Recorder::default());
        assert_eq!(b.handle(&req(REQ_PLUG, 2, 2), &d), ACK);
        let state = |b: &mut Blocks, block, n| b.handle(&req(REQ_STATE, block, n), &d);
        assert_eq!(
            state(&mut b, 2, 2),
            Response {
                kind: RESP_ACK,
                state: STATE_PLUGGED
            }
        );
        assert_eq!(
            state(&mut b, 4, 12),
            Response {
                kind: RESP_ACK,
                state: STATE_UNPLUGGED
            }
        );
        assert_eq!(
            state(&mut b, 0, 16),
            Response {
                kind: RESP_ACK,
                state: STATE_MIXED
            }
        );
    }

    #[test]
    fn test_unknown_request_type_is_an_error() {
        let (mut b, d) = (blocks(8), Recorder::default());
        assert_eq!(b.handle(&req(4, 0, 1), &d), ERROR);
        assert_eq!(b.handle(&req(u16::MAX, 0, 1), &d), ERROR);
    }

    #[test]
    fn test_request_and_response_layouts_are_little_endian() {
        let mut bytes = [0u8; REQUEST_LEN];
        bytes[0] = 1;
        bytes[8..16].copy_from_slice(&0x1_4020_0000u64.to_le_bytes());
        bytes[16..18].copy_from_slice(&300u16.to_le_bytes());
        bytes[2] = 0xff; // padding is ignored
        assert_eq!(
            Request::parse(&bytes),
            Request {
                kind: REQ_UNPLUG,
                addr: 0x1_4020_0000,
                nb_blocks: 300
            }
        );
        let resp = Response {
            kind: RESP_ACK,
            state: STATE_MIXED,
        }
        .to_bytes();
        assert_eq!(resp, [0, 0, 0, 0, 0, 0, 0, 0, 2, 0]);
    }

    #[test]
    fn test_requested_size_is_capped_at_the_region() {
        let mut b = blocks(0);
        b.set_requested_blocks(1000);
        assert_eq!(b.requested_size(), 16 * BLOCK);
    }
}
