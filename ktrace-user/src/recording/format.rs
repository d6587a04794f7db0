//! The bytes of a recording: file header, block frames, and the records
//! inside a block. `docs/recording-format.md` is the prose version of this
//! file; keep them in step.
//!
//! ```text
//! file   := file_header block*
//! block  := frame_header(56 bytes) payload(stored_len bytes)
//! payload (after decompression) := record*
//! record := tag:varint len:varint body[len]
//! ```
//!
//! Blocks are independent: each has its own dictionaries (IP addresses,
//! strings, network namespaces) and its own timestamp base, so a reader can
//! skip a corrupt block and decode the next one.

use std::net::{IpAddr, SocketAddr};

use crate::event::{
    CounterRise, CtInvalid, Event, EventBody, IpvsConnNew, NatEntry, ResetCounts, Source,
};

/// First 8 bytes of every recording file (PNG-style: the high byte and the
/// line endings catch text-mode transfers).
pub const FILE_MAGIC: [u8; 8] = *b"\x89KTR\r\n\x1a\n";
/// Major format version: a reader refuses a greater one.
pub const VERSION_MAJOR: u16 = 1;
/// Minor format version: additions old readers can skip (new record tags,
/// new trailing fields, new header keys).
pub const VERSION_MINOR: u16 = 5;
/// Fixed part of the file header: magic, major, minor, JSON length, CRC.
pub const FILE_HEADER_FIXED: usize = 20;
/// The JSON context of a file header is at most this long.
pub const MAX_CONTEXT_BYTES: usize = 1 << 20;

/// First 4 bytes of every block frame (what a reader resynchronises on).
pub const BLOCK_MAGIC: [u8; 4] = *b"KTBK";
pub const FRAME_HEADER_LEN: usize = 56;
pub const BLOCK_KIND_RECORDS: u8 = 1;
pub const CODEC_NONE: u8 = 0;
pub const CODEC_ZSTD: u8 = 1;
/// Frame flag (minor 4): the block's payload starts with name records its
/// segment's later blocks rely on (see `recording::names`), so a reader
/// that skips the block still reads those.
pub const FLAG_NAMES: u16 = 1;
/// Stored and raw block payloads are at most this long (a reader refuses more).
pub const MAX_BLOCK_BYTES: usize = 16 << 20;

/// Record tags. Event variants 0x01..0x3f, meta records 0x40..0x5f,
/// dictionary definitions 0x60..0x7f. A reader skips a tag it does not know
/// (the length says how far); each dictionary kind has its own index space,
/// so skipping an unknown definition never shifts a known one.
pub mod tag {
    pub const TCP_SEND_RESET: u64 = 0x01;
    pub const TCP_RECEIVE_RESET: u64 = 0x02;
    pub const CT_INVALID: u64 = 0x03;
    pub const CT_TABLE_FULL: u64 = 0x04;
    pub const IPVS_CONN_NEW: u64 = 0x05;
    pub const NAT_MAPPING: u64 = 0x06;
    pub const NAT_DESTROY: u64 = 0x07;
    pub const CT_COUNTERS: u64 = 0x08;
    pub const CT_CONFIRM_DROP: u64 = 0x09;
    /// Resets the kernel counted instead of sending them one by one (minor
    /// version 5). Its timestamp is a delta from the previous record's but
    /// does not become the next record's base: a reader that skips the tag
    /// keeps the timestamp chain.
    pub const RESETS_SUMMARISED: u64 = 0x0a;
    pub const TICK: u64 = 0x40;
    pub const LOST: u64 = 0x41;
    pub const DROPPED: u64 = 0x42;
    pub const DEF_IP: u64 = 0x60;
    pub const DEF_STR: u64 = 0x61;
    pub const DEF_NETNS: u64 = 0x62;
    /// A Kubernetes name of an address (minor version 1; see
    /// `crate::names::record`). No timestamp: a reader that skips it keeps
    /// the timestamp chain.
    pub const DEF_NAME: u64 = 0x63;
}

/// One thing a recording holds, in the order the live pipeline saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A kernel or ctnetlink event.
    Event(Event),
    /// The live pipeline advanced the engine's clock (`Engine::tick`).
    Tick { ts_ns: u64 },
    /// Events the kernel could not hand over (ring buffer full, netlink overrun).
    Lost {
        ts_ns: u64,
        count: u64,
        total: u64,
        what: String,
    },
    /// Events the recorder itself could not write (disk full, queue full).
    Dropped {
        ts_ns: u64,
        count: u64,
        reason: String,
    },
    /// A Kubernetes name known at this point (`ts_ns`: the record before it).
    Name {
        ts_ns: u64,
        record: crate::names::NameRecord,
    },
}

impl Item {
    pub fn ts_ns(&self) -> u64 {
        match self {
            Item::Event(e) => e.ts_ns,
            Item::Tick { ts_ns }
            | Item::Lost { ts_ns, .. }
            | Item::Dropped { ts_ns, .. }
            | Item::Name { ts_ns, .. } => *ts_ns,
        }
    }
}

// ---------------------------------------------------------------- varints

// The byte-level primitives live below both the recording and the names
// (whose records a recording carries), so neither imports the other's.
pub use crate::wire::{put_varint, unzigzag, zigzag, Cursor, Malformed};

// ---------------------------------------------------------------- frames

/// The fixed header of a block frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: u8,
    pub codec: u8,
    /// [`FLAG_NAMES`]; zero before minor 4.
    pub flags: u16,
    pub stored_len: u32,
    pub raw_len: u32,
    /// Records other than dictionary definitions.
    pub items: u32,
    /// Of which kernel events.
    pub events: u32,
    /// Timestamp deltas of the block start from here.
    pub base_ts: u64,
    pub min_ts: u64,
    pub max_ts: u64,
    pub payload_crc: u32,
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut h = [0u8; FRAME_HEADER_LEN];
        h[0..4].copy_from_slice(&BLOCK_MAGIC);
        h[4] = self.kind;
        h[5] = self.codec;
        h[6..8].copy_from_slice(&self.flags.to_le_bytes());
        h[8..12].copy_from_slice(&self.stored_len.to_le_bytes());
        h[12..16].copy_from_slice(&self.raw_len.to_le_bytes());
        h[16..20].copy_from_slice(&self.items.to_le_bytes());
        h[20..24].copy_from_slice(&self.events.to_le_bytes());
        h[24..32].copy_from_slice(&self.base_ts.to_le_bytes());
        h[32..40].copy_from_slice(&self.min_ts.to_le_bytes());
        h[40..48].copy_from_slice(&self.max_ts.to_le_bytes());
        h[48..52].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32fast::hash(&h[..52]);
        h[52..56].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parses and checks a frame header (magic, CRC, bounds).
    pub fn decode(h: &[u8]) -> Result<FrameHeader, Malformed> {
        if h.len() < FRAME_HEADER_LEN {
            return Err(Malformed("frame header ends early"));
        }
        if h[0..4] != BLOCK_MAGIC {
            return Err(Malformed("no block magic"));
        }
        let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[i..i + 8]);
            u64::from_le_bytes(b)
        };
        if crc32fast::hash(&h[..52]) != u32_at(52) {
            return Err(Malformed("frame header checksum mismatch"));
        }
        let f = FrameHeader {
            kind: h[4],
            codec: h[5],
            flags: u16::from_le_bytes([h[6], h[7]]),
            stored_len: u32_at(8),
            raw_len: u32_at(12),
            items: u32_at(16),
            events: u32_at(20),
            base_ts: u64_at(24),
            min_ts: u64_at(32),
            max_ts: u64_at(40),
            payload_crc: u32_at(48),
        };
        if f.stored_len as usize > MAX_BLOCK_BYTES || f.raw_len as usize > MAX_BLOCK_BYTES {
            return Err(Malformed("block larger than the format allows"));
        }
        Ok(f)
    }
}

// ---------------------------------------------------------------- hashing

/// The dictionaries are hashed per event, and SipHash would be the largest
/// cost of encoding with them: foldhash, as the engine's tables use.
type DictMap<K, V> = foldhash::HashMap<K, V>;

// ---------------------------------------------------------------- encoding

fn source_code(s: Source) -> u8 {
    match s {
        Source::Tracepoint => 0,
        Source::Kprobe => 1,
        Source::Kretprobe => 2,
        Source::Ctnetlink => 3,
        Source::Procfs => 4,
        Source::RawTracepoint => 5,
        Source::Fentry => 6,
    }
}

fn source_from(c: u8) -> Result<Source, Malformed> {
    Ok(match c {
        0 => Source::Tracepoint,
        1 => Source::Kprobe,
        2 => Source::Kretprobe,
        3 => Source::Ctnetlink,
        4 => Source::Procfs,
        5 => Source::RawTracepoint,
        6 => Source::Fentry,
        _ => return Err(Malformed("unknown event source")),
    })
}

/// Every variant has its own tag: a new EventBody variant fails to compile
/// here until it gets one (and its fields an encoder and a decoder arm).
fn event_tag(body: &EventBody) -> u64 {
    match body {
        EventBody::TcpSendReset { .. } => tag::TCP_SEND_RESET,
        EventBody::TcpReceiveReset { .. } => tag::TCP_RECEIVE_RESET,
        EventBody::CtInvalid(_) => tag::CT_INVALID,
        EventBody::CtTableFull { .. } => tag::CT_TABLE_FULL,
        EventBody::IpvsConnNew(_) => tag::IPVS_CONN_NEW,
        EventBody::NatMapping(_) => tag::NAT_MAPPING,
        EventBody::NatDestroy(_) => tag::NAT_DESTROY,
        EventBody::CtConfirmDrop(_) => tag::CT_CONFIRM_DROP,
        EventBody::CtCounters(_) => tag::CT_COUNTERS,
        EventBody::ResetsSummarised(_) => tag::RESETS_SUMMARISED,
    }
}

/// Tags added after readers existed whose timestamp does not become the
/// next record's base (older readers skip them and keep the chain).
fn detached_ts(tag: u64) -> bool {
    tag == tag::RESETS_SUMMARISED
}

/// Builds the uncompressed payload of one block.
pub struct BlockEncoder {
    buf: Vec<u8>,
    /// The fields of the event being encoded (its dictionary entries go
    /// into `buf` first).
    fields: Vec<u8>,
    ips: DictMap<IpAddr, u32>,
    /// The addresses the block defines, in order, when names are recorded
    /// ([`list_ips`](Self::list_ips)): the ones whose names it may need.
    block_ips: Option<Vec<IpAddr>>,
    strs: DictMap<Box<str>, u32>,
    netns: DictMap<u32, u32>,
    base_ts: u64,
    prev_ts: u64,
    min_ts: u64,
    max_ts: u64,
    items: u32,
    events: u32,
}

impl Default for BlockEncoder {
    fn default() -> Self {
        Self::new()
    }
}

/// The names of one address, as a recording stores them.
#[derive(Debug, PartialEq, Eq)]
pub struct NamedAddr {
    pub ip: IpAddr,
    /// Complete `DEF_NAME` records (tag, length, body), ready for a payload.
    pub records: Box<[u8]>,
}

impl NamedAddr {
    pub fn encode(ip: IpAddr, records: &[crate::names::NameRecord]) -> NamedAddr {
        let mut out = Vec::new();
        Self::encode_into(records, &mut out);
        NamedAddr {
            ip,
            records: out.into_boxed_slice(),
        }
    }

    /// Appends `records` as `DEF_NAME` records to `out`, each body encoded
    /// in place behind a one-byte length (moved along in the rare case
    /// its length needs more).
    pub fn encode_into(records: &[crate::names::NameRecord], out: &mut Vec<u8>) {
        for r in records {
            put_varint(out, tag::DEF_NAME);
            let at = out.len();
            out.push(0);
            r.encode(out);
            let len = out.len() - at - 1;
            if len < 0x80 {
                out[at] = len as u8;
            } else {
                let mut l = Vec::with_capacity(4);
                put_varint(&mut l, len as u64);
                out.splice(at..at + 1, l);
            }
        }
    }
}

/// A finished, uncompressed block.
#[derive(Debug, Clone, Default)]
pub struct RawBlock {
    pub payload: Vec<u8>,
    pub items: u32,
    pub events: u32,
    pub base_ts: u64,
    pub min_ts: u64,
    pub max_ts: u64,
    /// The names of the block's addresses (the writer puts those its
    /// segment lacks in front of the payload).
    pub names: Vec<std::sync::Arc<NamedAddr>>,
    /// Addresses whose names the block relies on beyond those it defines
    /// (those of findings; [`defined_ips`] reads the others back), and the
    /// names' epoch it was encoded in (see `recording::names`).
    pub ips: Vec<IpAddr>,
    pub epoch: u64,
}

impl BlockEncoder {
    pub fn new() -> Self {
        BlockEncoder {
            buf: Vec::with_capacity(1 << 16),
            fields: Vec::with_capacity(64),
            ips: DictMap::default(),
            block_ips: None,
            strs: DictMap::default(),
            netns: DictMap::default(),
            base_ts: 0,
            prev_ts: 0,
            min_ts: u64::MAX,
            max_ts: 0,
            items: 0,
            events: 0,
        }
    }

    /// Bytes of payload so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items == 0
    }

    pub fn events(&self) -> u32 {
        self.events
    }

    /// From now on, lists the addresses each block defines
    /// ([`block_ips`](Self::block_ips)).
    pub fn list_ips(&mut self) {
        self.block_ips.get_or_insert_with(Vec::new);
    }

    /// The addresses this block defines so far, in order (when listed).
    pub fn block_ips(&self) -> &[IpAddr] {
        self.block_ips.as_deref().unwrap_or_default()
    }

    /// Hands over the block and starts a new one (dictionaries reset).
    pub fn take(&mut self) -> RawBlock {
        let block = RawBlock {
            payload: std::mem::replace(&mut self.buf, Vec::with_capacity(1 << 16)),
            items: self.items,
            events: self.events,
            base_ts: self.base_ts,
            min_ts: if self.items == 0 { 0 } else { self.min_ts },
            max_ts: self.max_ts,
            names: Vec::new(),
            ips: Vec::new(),
            epoch: 0,
        };
        if let Some(l) = &mut self.block_ips {
            l.clear();
        }
        self.ips.clear();
        self.strs.clear();
        self.netns.clear();
        self.items = 0;
        self.events = 0;
        self.min_ts = u64::MAX;
        self.max_ts = 0;
        block
    }

    fn def(&mut self, tag: u64, body: &[u8]) {
        put_varint(&mut self.buf, tag);
        put_varint(&mut self.buf, body.len() as u64);
        self.buf.extend_from_slice(body);
    }

    #[inline]
    fn ip(&mut self, ip: IpAddr) -> u32 {
        if let Some(&i) = self.ips.get(&ip) {
            return i + 1;
        }
        let i = self.ips.len() as u32;
        self.ips.insert(ip, i);
        if let Some(l) = &mut self.block_ips {
            l.push(ip);
        }
        match ip {
            IpAddr::V4(a) => {
                let o = a.octets();
                self.def(tag::DEF_IP, &[4, o[0], o[1], o[2], o[3]]);
            }
            IpAddr::V6(a) => {
                let mut b = [0u8; 17];
                b[0] = 6;
                b[1..].copy_from_slice(&a.octets());
                self.def(tag::DEF_IP, &b);
            }
        }
        i + 1
    }

    fn string(&mut self, s: Option<&str>) -> u32 {
        let Some(s) = s else { return 0 };
        if let Some(&i) = self.strs.get(s) {
            return i + 1;
        }
        let i = self.strs.len() as u32;
        self.strs.insert(s.into(), i);
        self.def(tag::DEF_STR, s.as_bytes());
        i + 1
    }

    #[inline]
    fn netns(&mut self, n: u32) -> u32 {
        if let Some(&i) = self.netns.get(&n) {
            return i;
        }
        let i = self.netns.len() as u32;
        self.netns.insert(n, i);
        let mut b = Vec::with_capacity(5);
        put_varint(&mut b, u64::from(n));
        self.def(tag::DEF_NETNS, &b);
        i
    }

    /// Starts a timestamped record; returns where its length goes.
    #[inline]
    fn begin(&mut self, tag: u64, ts: u64) -> usize {
        if self.items == 0 {
            self.base_ts = ts;
            self.prev_ts = ts;
        }
        self.items += 1;
        self.min_ts = self.min_ts.min(ts);
        self.max_ts = self.max_ts.max(ts);
        put_varint(&mut self.buf, tag);
        let at = self.buf.len();
        self.buf.push(0);
        put_varint(&mut self.buf, zigzag(ts.wrapping_sub(self.prev_ts) as i64));
        if !detached_ts(tag) {
            self.prev_ts = ts;
        }
        at
    }

    #[inline]
    fn end(&mut self, at: usize) {
        let len = self.buf.len() - at - 1;
        if len < 0x80 {
            self.buf[at] = len as u8;
        } else {
            let mut v = Vec::with_capacity(4);
            put_varint(&mut v, len as u64);
            self.buf[at] = v[0];
            self.buf.splice(at + 1..at + 1, v[1..].iter().copied());
        }
    }

    /// Appends one event (and the dictionary entries it needs first).
    pub fn push_event(&mut self, ev: &Event) {
        let ns = self.netns(ev.netns);
        let mut fields = std::mem::take(&mut self.fields);
        fields.clear();
        self.event_fields(&ev.body, &mut fields);
        let at = self.head(event_tag(&ev.body), ev.ts_ns, ns, source_code(ev.source));
        self.buf.extend_from_slice(&fields);
        self.end(at);
        self.fields = fields;
        self.events += 1;
    }

    /// Writes the fields of `body` into `f` (and the dictionary entries
    /// they name into the block), as [`BlockDecoder::event_body`] reads them.
    fn event_fields(&mut self, body: &EventBody, f: &mut Vec<u8>) {
        match body {
            EventBody::TcpSendReset {
                src,
                dst,
                reason,
                trigger_flags,
                socket,
            } => {
                self.eps(f, &[*src, *dst]);
                self.str_field(f, reason.as_deref());
                // The state byte is 0 without a socket.
                let flags = u8::from(socket.is_some()) | (u8::from(trigger_flags.is_some()) << 1);
                f.extend_from_slice(&[flags, socket.unwrap_or(0)]);
                f.extend(*trigger_flags);
            }
            EventBody::TcpReceiveReset {
                src,
                dst,
                sock_cookie,
            } => {
                self.eps(f, &[*src, *dst]);
                put_varint(f, *sock_cookie);
            }
            EventBody::CtInvalid(c) => {
                self.eps(f, &[c.src, c.dst]);
                for e in [c.orig_src, c.orig_dst, c.reply_src] {
                    self.ep_field(f, e);
                }
                f.push(u8::from(c.reply_dir));
                self.str_field(f, c.message.as_deref());
            }
            EventBody::CtTableFull { src, dst, errno } => {
                self.eps(f, &[*src, *dst]);
                put_varint(f, zigzag(i64::from(*errno)));
            }
            EventBody::IpvsConnNew(c) => {
                self.eps(f, &[c.client, c.service, c.real_server]);
                let flags = u8::from(c.template) | (u8::from(c.weight.is_some()) << 1);
                f.extend_from_slice(&[c.protocol, flags]);
                put_varint(f, u64::from(c.conn_flags));
                put_varint(f, u64::from(c.dest_flags));
                if let Some(w) = c.weight {
                    put_varint(f, zigzag(i64::from(w)));
                }
            }
            EventBody::NatMapping(nat)
            | EventBody::NatDestroy(nat)
            | EventBody::CtConfirmDrop(nat) => {
                self.eps(f, &[nat.client, nat.service, nat.backend]);
                f.push(nat.protocol);
                // Minor 1: a trailing SNAT endpoint (older readers skip it).
                if let Some(n) = nat.snat {
                    self.ep_field(f, Some(n));
                }
            }
            EventBody::ResetsSummarised(c) => {
                put_varint(f, c.refused);
                put_varint(f, c.socket);
            }
            EventBody::CtCounters(c) => {
                for v in [c.invalid, c.drop, c.early_drop, c.insert_failed] {
                    put_varint(f, v);
                }
                // Optional values as value + 1 (0 = unknown).
                for v in [c.count, c.max] {
                    put_varint(f, v.map_or(0, |x| x.saturating_add(1)));
                }
                // Minor 1: clash resolutions, trailing (older readers skip it).
                if c.clash_resolve > 0 {
                    put_varint(f, c.clash_resolve);
                }
            }
        }
    }

    /// An endpoint field: its IP's dictionary reference (0 = absent), then
    /// the port (big-endian) when present.
    #[inline]
    fn ep_field(&mut self, f: &mut Vec<u8>, a: Option<SocketAddr>) {
        let Some(a) = a else {
            put_varint(f, 0);
            return;
        };
        put_varint(f, u64::from(self.ip(a.ip())));
        f.extend_from_slice(&a.port().to_be_bytes());
    }

    #[inline]
    fn eps(&mut self, f: &mut Vec<u8>, eps: &[SocketAddr]) {
        for e in eps {
            self.ep_field(f, Some(*e));
        }
    }

    /// A string field: its dictionary reference (0 = absent).
    fn str_field(&mut self, f: &mut Vec<u8>, s: Option<&str>) {
        let r = self.string(s);
        put_varint(f, u64::from(r));
    }

    /// Common prefix of an event record: tag, length, ts delta, netns, source.
    #[inline]
    fn head(&mut self, tag: u64, ts: u64, netns: u32, source: u8) -> usize {
        let at = self.begin(tag, ts);
        put_varint(&mut self.buf, u64::from(netns));
        self.buf.push(source);
        at
    }

    pub fn push_tick(&mut self, ts: u64) {
        let at = self.begin(tag::TICK, ts);
        self.end(at);
    }

    pub fn push_lost(&mut self, ts: u64, count: u64, total: u64, what: &str) {
        let w = self.string(Some(what));
        let at = self.begin(tag::LOST, ts);
        put_varint(&mut self.buf, count);
        put_varint(&mut self.buf, total);
        put_varint(&mut self.buf, u64::from(w));
        self.end(at);
    }

    pub fn push_dropped(&mut self, ts: u64, count: u64, reason: &str) {
        let r = self.string(Some(reason));
        let at = self.begin(tag::DROPPED, ts);
        put_varint(&mut self.buf, count);
        put_varint(&mut self.buf, u64::from(r));
        self.end(at);
    }

    pub fn push_item(&mut self, item: &Item) {
        match item {
            Item::Event(e) => self.push_event(e),
            Item::Tick { ts_ns } => self.push_tick(*ts_ns),
            Item::Lost {
                ts_ns,
                count,
                total,
                what,
            } => self.push_lost(*ts_ns, *count, *total, what),
            Item::Dropped {
                ts_ns,
                count,
                reason,
            } => self.push_dropped(*ts_ns, *count, reason),
            Item::Name { record, .. } => self.push_name(record),
        }
    }

    /// A Kubernetes name (a definition-like record: no timestamp).
    pub fn push_name(&mut self, r: &crate::names::NameRecord) {
        let mut body = Vec::with_capacity(48);
        r.encode(&mut body);
        self.def(tag::DEF_NAME, &body);
    }

    /// Appends a record with an arbitrary tag and body (tests of unknown tags).
    #[doc(hidden)]
    pub fn push_raw(&mut self, tag: u64, body: &[u8]) {
        self.items += 1;
        self.def(tag, body);
    }
}

// ---------------------------------------------------------------- decoding

/// What one record of a block decoded to.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Item(Item),
    /// A dictionary entry (nothing to hand on).
    Definition,
    /// A tag this reader does not know (a newer writer's); skipped.
    Unknown(u64),
    /// A known record whose body does not decode; skipped.
    Bad(u64, Malformed),
}

/// Appends to `out` the addresses a block's payload defines (its `DEF_IP`
/// records), decoding nothing else. Stops at broken framing (the payload
/// is the encoder's own).
pub fn defined_ips(payload: &[u8], out: &mut Vec<IpAddr>) {
    let mut cur = Cursor::new(payload);
    while !cur.is_empty() {
        let (Ok(t), Ok(len)) = (cur.varint(), cur.varint()) else {
            return;
        };
        let Some(body) = usize::try_from(len).ok().and_then(|n| cur.bytes(n).ok()) else {
            return;
        };
        if t == tag::DEF_IP {
            if let Ok(ip) = Cursor::new(body).ip() {
                out.push(ip);
            }
        }
    }
}

/// Decodes the records of one (decompressed) block payload.
pub struct BlockDecoder<'a> {
    cur: Cursor<'a>,
    ips: Vec<IpAddr>,
    /// Shared with the events that cite them (no allocation per event).
    strs: Vec<std::sync::Arc<str>>,
    netns: Vec<u32>,
    prev_ts: u64,
}

impl<'a> BlockDecoder<'a> {
    pub fn new(payload: &'a [u8], base_ts: u64) -> Self {
        BlockDecoder {
            cur: Cursor::new(payload),
            ips: Vec::new(),
            strs: Vec::new(),
            netns: Vec::new(),
            prev_ts: base_ts,
        }
    }

    /// The next record; `Err` when the framing of the block itself is
    /// broken (nothing after it can be trusted).
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<Result<Decoded, Malformed>> {
        if self.cur.is_empty() {
            return None;
        }
        Some(self.record())
    }

    fn record(&mut self) -> Result<Decoded, Malformed> {
        let t = self.cur.varint()?;
        let len = self.cur.varint()?;
        let len = usize::try_from(len).map_err(|_| Malformed("record length overflows"))?;
        let body = self
            .cur
            .bytes(len)
            .map_err(|_| Malformed("record longer than its block"))?;
        let mut b = Cursor::new(body);
        match t {
            tag::DEF_IP => {
                let ip = b.ip()?;
                self.ips.push(ip);
                Ok(Decoded::Definition)
            }
            tag::DEF_STR => {
                let s = std::str::from_utf8(body)
                    .map_err(|_| Malformed("string definition is not UTF-8"))?;
                self.strs.push(s.into());
                Ok(Decoded::Definition)
            }
            tag::DEF_NETNS => {
                let n = b.varint_u32()?;
                self.netns.push(n);
                Ok(Decoded::Definition)
            }
            tag::DEF_NAME => match crate::names::NameRecord::decode(body) {
                Ok(record) => Ok(Decoded::Item(Item::Name {
                    ts_ns: self.prev_ts,
                    record,
                })),
                Err(e) => Ok(Decoded::Bad(t, e)),
            },
            tag::TCP_SEND_RESET..=tag::RESETS_SUMMARISED | tag::TICK | tag::LOST | tag::DROPPED => {
                // The timestamp chain must advance even when the rest of
                // the body is bad, or every later delta would be off.
                let delta = match b.varint() {
                    Ok(d) => unzigzag(d),
                    Err(e) => return Err(e),
                };
                let ts = self.prev_ts.wrapping_add(delta as u64);
                if !detached_ts(t) {
                    self.prev_ts = ts;
                }
                match self.body(t, ts, &mut b) {
                    Ok(item) => Ok(Decoded::Item(item)),
                    Err(e) => Ok(Decoded::Bad(t, e)),
                }
            }
            _ => Ok(Decoded::Unknown(t)),
        }
    }

    fn ep(&self, b: &mut Cursor) -> Result<Option<SocketAddr>, Malformed> {
        let r = b.varint()?;
        if r == 0 {
            return Ok(None);
        }
        let ip = *usize::try_from(r - 1)
            .ok()
            .and_then(|i| self.ips.get(i))
            .ok_or(Malformed("IP reference outside the block's dictionary"))?;
        Ok(Some(SocketAddr::new(ip, b.u16_be()?)))
    }

    fn req_ep(&self, b: &mut Cursor) -> Result<SocketAddr, Malformed> {
        self.ep(b)?.ok_or(Malformed("required endpoint is absent"))
    }

    fn string(&self, b: &mut Cursor) -> Result<Option<std::sync::Arc<str>>, Malformed> {
        let r = b.varint()?;
        if r == 0 {
            return Ok(None);
        }
        usize::try_from(r - 1)
            .ok()
            .and_then(|i| self.strs.get(i))
            .cloned()
            .map(Some)
            .ok_or(Malformed("string reference outside the block's dictionary"))
    }

    fn body(&self, t: u64, ts_ns: u64, b: &mut Cursor) -> Result<Item, Malformed> {
        match t {
            tag::TICK => return Ok(Item::Tick { ts_ns }),
            tag::LOST => {
                return Ok(Item::Lost {
                    ts_ns,
                    count: b.varint()?,
                    total: b.varint()?,
                    what: self.string(b)?.map(|s| s.to_string()).unwrap_or_default(),
                })
            }
            tag::DROPPED => {
                return Ok(Item::Dropped {
                    ts_ns,
                    count: b.varint()?,
                    reason: self.string(b)?.map(|s| s.to_string()).unwrap_or_default(),
                })
            }
            _ => {}
        }
        let ns = b.varint()?;
        let netns = *usize::try_from(ns)
            .ok()
            .and_then(|i| self.netns.get(i))
            .ok_or(Malformed("netns reference outside the block's dictionary"))?;
        let source = source_from(b.u8()?)?;
        let body = self.event_body(t, b)?;
        // Bytes left in `b` are fields a newer minor version appended: ignored.
        Ok(Item::Event(Event {
            ts_ns,
            netns,
            source,
            body,
        }))
    }

    /// The fields of an event record after its header, as
    /// [`BlockEncoder::event_fields`] wrote them.
    fn event_body(&self, t: u64, b: &mut Cursor) -> Result<EventBody, Malformed> {
        Ok(match t {
            tag::TCP_SEND_RESET => {
                let (src, dst, reason) = (self.req_ep(b)?, self.req_ep(b)?, self.string(b)?);
                let (flags, state) = (b.u8()?, b.u8()?);
                EventBody::TcpSendReset {
                    src,
                    dst,
                    reason,
                    trigger_flags: if flags & 2 != 0 { Some(b.u8()?) } else { None },
                    socket: (flags & 1 != 0).then_some(state),
                }
            }
            tag::TCP_RECEIVE_RESET => EventBody::TcpReceiveReset {
                src: self.req_ep(b)?,
                dst: self.req_ep(b)?,
                sock_cookie: b.varint()?,
            },
            tag::CT_INVALID => EventBody::CtInvalid(Box::new(CtInvalid {
                src: self.req_ep(b)?,
                dst: self.req_ep(b)?,
                orig_src: self.ep(b)?,
                orig_dst: self.ep(b)?,
                reply_src: self.ep(b)?,
                reply_dir: b.u8()? & 1 != 0,
                message: self.string(b)?,
            })),
            tag::CT_TABLE_FULL => EventBody::CtTableFull {
                src: self.req_ep(b)?,
                dst: self.req_ep(b)?,
                errno: b.varint_i32("errno out of range")?,
            },
            tag::IPVS_CONN_NEW => {
                let eps = (self.req_ep(b)?, self.req_ep(b)?, self.req_ep(b)?);
                let (protocol, flags) = (b.u8()?, b.u8()?);
                EventBody::IpvsConnNew(Box::new(IpvsConnNew {
                    client: eps.0,
                    service: eps.1,
                    real_server: eps.2,
                    protocol,
                    template: flags & 1 != 0,
                    conn_flags: b.varint_u32()?,
                    dest_flags: b.varint_u32()?,
                    weight: if flags & 2 != 0 {
                        Some(b.varint_i32("weight out of range")?)
                    } else {
                        None
                    },
                }))
            }
            tag::NAT_MAPPING | tag::NAT_DESTROY | tag::CT_CONFIRM_DROP => {
                let nat = NatEntry {
                    client: self.req_ep(b)?,
                    service: self.req_ep(b)?,
                    backend: self.req_ep(b)?,
                    protocol: b.u8()?,
                    // Absent before minor 1 and when the flow was not SNATed.
                    snat: if b.is_empty() { None } else { self.ep(b)? },
                };
                match t {
                    tag::NAT_MAPPING => EventBody::NatMapping(Box::new(nat)),
                    tag::NAT_DESTROY => EventBody::NatDestroy(Box::new(nat)),
                    _ => EventBody::CtConfirmDrop(Box::new(nat)),
                }
            }
            tag::RESETS_SUMMARISED => EventBody::ResetsSummarised(ResetCounts {
                refused: b.varint()?,
                socket: b.varint()?,
            }),
            tag::CT_COUNTERS => EventBody::CtCounters(CounterRise {
                invalid: b.varint()?,
                drop: b.varint()?,
                early_drop: b.varint()?,
                insert_failed: b.varint()?,
                // Optional values as value + 1 (0 = unknown).
                count: b.varint()?.checked_sub(1),
                max: b.varint()?.checked_sub(1),
                // Absent before minor 1 and when no clash was resolved.
                clash_resolve: if b.is_empty() { 0 } else { b.varint()? },
            }),
            _ => return Err(Malformed("unknown event tag")),
        })
    }
}

// ---------------------------------------------------------------- sealing

/// Compresses a raw block into a complete frame (header + payload).
pub struct FrameSealer {
    comp: Option<zstd::bulk::Compressor<'static>>,
    scratch: Vec<u8>,
    /// Name records then the block's payload, when the block carries names.
    joined: Vec<u8>,
}

impl FrameSealer {
    /// `level` 0 stores blocks uncompressed; otherwise a zstd level.
    pub fn new(level: i32) -> FrameSealer {
        let comp = if level == 0 {
            None
        } else {
            zstd::bulk::Compressor::new(level).ok()
        };
        FrameSealer {
            comp,
            scratch: Vec::new(),
            joined: Vec::new(),
        }
    }

    /// Writes the frame of `block` into `out` (cleared first).
    pub fn seal(&mut self, block: &RawBlock, out: &mut Vec<u8>) {
        self.seal_with(&[], block, out);
    }

    /// Like [`seal`](Self::seal), with the name records `names` in front of
    /// the block's records (the frame then has [`FLAG_NAMES`]).
    pub fn seal_with(&mut self, names: &[u8], block: &RawBlock, out: &mut Vec<u8>) {
        out.clear();
        let raw: &[u8] = if names.is_empty() {
            &block.payload
        } else {
            self.joined.clear();
            self.joined.extend_from_slice(names);
            self.joined.extend_from_slice(&block.payload);
            &self.joined
        };
        let mut codec = CODEC_NONE;
        if let Some(c) = &mut self.comp {
            self.scratch.clear();
            self.scratch
                .reserve(zstd::zstd_safe::compress_bound(raw.len()));
            if c.compress_to_buffer(raw, &mut self.scratch).is_ok()
                && self.scratch.len() < raw.len()
            {
                codec = CODEC_ZSTD;
            }
        }
        let stored: &[u8] = if codec == CODEC_ZSTD {
            &self.scratch
        } else {
            raw
        };
        let h = FrameHeader {
            kind: BLOCK_KIND_RECORDS,
            codec,
            flags: if names.is_empty() { 0 } else { FLAG_NAMES },
            stored_len: stored.len() as u32,
            raw_len: raw.len() as u32,
            items: block.items,
            events: block.events,
            base_ts: block.base_ts,
            min_ts: block.min_ts,
            max_ts: block.max_ts,
            payload_crc: crc32fast::hash(stored),
        };
        out.extend_from_slice(&h.encode());
        out.extend_from_slice(stored);
    }
}

/// Decompresses a frame's payload into `out` after checking its CRC.
pub fn open_payload(
    h: &FrameHeader,
    stored: &[u8],
    dec: &mut Option<zstd::bulk::Decompressor<'static>>,
    out: &mut Vec<u8>,
) -> Result<(), Malformed> {
    if crc32fast::hash(stored) != h.payload_crc {
        return Err(Malformed("block checksum mismatch"));
    }
    out.clear();
    match h.codec {
        CODEC_NONE => {
            if stored.len() != h.raw_len as usize {
                return Err(Malformed("stored block length differs from its raw length"));
            }
            out.extend_from_slice(stored);
        }
        CODEC_ZSTD => {
            if dec.is_none() {
                *dec = zstd::bulk::Decompressor::new().ok();
            }
            let d = dec
                .as_mut()
                .ok_or(Malformed("cannot create a zstd decompressor"))?;
            out.reserve(h.raw_len as usize);
            let n = d
                .decompress_to_buffer(stored, out)
                .map_err(|_| Malformed("block does not decompress"))?;
            if n != h.raw_len as usize {
                return Err(Malformed(
                    "decompressed block length differs from its header",
                ));
            }
        }
        _ => return Err(Malformed("unknown block codec")),
    }
    Ok(())
}
