//! NBD wire format: magic numbers, constants and pure encoders/decoders.
//!
//! Everything on the NBD wire is big-endian (network byte order). The layouts
//! follow `doc/proto.md` of the NBD project (fixed newstyle negotiation,
//! simple and structured replies). Nothing here touches a socket: decoders
//! take byte slices, encoders append to a `Vec<u8>`, so both the server
//! (`export::nbd`) and the client (`upstream::nbd`) share one tested codec.

use thiserror::Error;

/// "NBDMAGIC": first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle magic, also prefixes every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission-phase request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Server handshake flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;

/// Info types carried by `REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// The one metadata context herd serves, and its flags.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

/// Structured reply flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// Errno values the protocol carries (Linux numbering, as the spec fixes).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Largest request payload herd accepts or sends (the spec's common maximum).
pub const MAX_REQUEST: u32 = 32 * 1024 * 1024;
/// Longest option payload the server reads (export names are short).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_HEADER_LEN: usize = 20;
pub const OPTION_HEADER_LEN: usize = 16;
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
pub const GREETING_LEN: usize = 18;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("input too short: need {need} bytes, have {have}")]
    Short { need: usize, have: usize },
    #[error("bad magic {found:#x}, expected {expected:#x}")]
    BadMagic { expected: u64, found: u64 },
    #[error("option payload of {len} bytes is malformed")]
    BadOptionPayload { len: usize },
    #[error("option payload of {len} bytes exceeds the {MAX_OPTION_LEN}-byte limit")]
    OptionTooLong { len: u32 },
    #[error("export name is not valid UTF-8")]
    BadName,
}

pub type ProtoResult<T> = Result<T, ProtoError>;

fn need(buf: &[u8], n: usize) -> ProtoResult<()> {
    if buf.len() < n {
        return Err(ProtoError::Short {
            need: n,
            have: buf.len(),
        });
    }
    Ok(())
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

// ---------------------------------------------------------------- handshake

/// The server's opening: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn encode_greeting(flags: u16, out: &mut Vec<u8>) {
    out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
}

/// Parses the server's opening; returns its handshake flags.
pub fn decode_greeting(buf: &[u8]) -> ProtoResult<u16> {
    need(buf, GREETING_LEN)?;
    let magic = be_u64(buf, 0);
    if magic != NBDMAGIC {
        return Err(ProtoError::BadMagic {
            expected: NBDMAGIC,
            found: magic,
        });
    }
    let opt = be_u64(buf, 8);
    if opt != IHAVEOPT {
        // Oldstyle servers send a size here; herd only speaks newstyle.
        return Err(ProtoError::BadMagic {
            expected: IHAVEOPT,
            found: opt,
        });
    }
    Ok(be_u16(buf, 16))
}

/// A client option header: which option and how long its payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

pub fn encode_option(option: u32, payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(payload);
}

pub fn decode_option_header(buf: &[u8]) -> ProtoResult<OptionHeader> {
    need(buf, OPTION_HEADER_LEN)?;
    let magic = be_u64(buf, 0);
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            expected: IHAVEOPT,
            found: magic,
        });
    }
    let h = OptionHeader {
        option: be_u32(buf, 8),
        len: be_u32(buf, 12),
    };
    if h.len > MAX_OPTION_LEN {
        return Err(ProtoError::OptionTooLong { len: h.len });
    }
    Ok(h)
}

/// Payload of NBD_OPT_INFO / NBD_OPT_GO: an export name and the info types
/// the client asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

pub fn encode_info_request(req: &InfoRequest) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + req.name.len() + 2 * req.infos.len());
    out.extend_from_slice(
        &u32::try_from(req.name.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(req.name.as_bytes());
    out.extend_from_slice(
        &u16::try_from(req.infos.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    for i in &req.infos {
        out.extend_from_slice(&i.to_be_bytes());
    }
    out
}

pub fn decode_info_request(buf: &[u8]) -> ProtoResult<InfoRequest> {
    let bad = ProtoError::BadOptionPayload { len: buf.len() };
    if buf.len() < 6 {
        return Err(bad);
    }
    let name_len = be_u32(buf, 0) as usize;
    let rest = &buf[4..];
    if rest.len() < name_len.saturating_add(2) {
        return Err(bad);
    }
    let name = std::str::from_utf8(&rest[..name_len])
        .map_err(|_| ProtoError::BadName)?
        .to_owned();
    let rest = &rest[name_len..];
    let count = be_u16(rest, 0) as usize;
    let rest = &rest[2..];
    if rest.len() != count * 2 {
        return Err(bad);
    }
    let infos = rest.chunks_exact(2).map(|c| be_u16(c, 0)).collect();
    Ok(InfoRequest { name, infos })
}

/// Payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: an
/// export name and the context queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

fn put_string(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A length-prefixed string at the front of `buf`, and what follows it.
fn take_string(buf: &[u8]) -> Option<(Result<String, ProtoError>, &[u8])> {
    let len = usize::try_from(be_u32(buf.get(..4)?, 0)).ok()?;
    let bytes = buf.get(4..4usize.checked_add(len)?)?;
    let s = std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| ProtoError::BadName);
    Some((s, &buf[4 + len..]))
}

pub fn encode_meta_context_request(req: &MetaContextRequest) -> Vec<u8> {
    let mut out = Vec::new();
    put_string(&req.export, &mut out);
    out.extend_from_slice(
        &u32::try_from(req.queries.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    for q in &req.queries {
        put_string(q, &mut out);
    }
    out
}

/// # Errors
/// `BadOptionPayload` when lengths and counts do not add up to the
/// payload exactly; `BadName` for a string that is not UTF-8.
pub fn decode_meta_context_request(buf: &[u8]) -> ProtoResult<MetaContextRequest> {
    let bad = || ProtoError::BadOptionPayload { len: buf.len() };
    let (export, rest) = take_string(buf).ok_or_else(bad)?;
    let export = export?;
    let count = be_u32(rest.get(..4).ok_or_else(bad)?, 0);
    let mut rest = &rest[4..];
    // Each query takes at least its 4-byte length: a count the payload
    // cannot hold is refused before anything is allocated for it.
    if u64::from(count) * 4 > rest.len() as u64 {
        return Err(bad());
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let (q, more) = take_string(rest).ok_or_else(bad)?;
        queries.push(q?);
        rest = more;
    }
    if !rest.is_empty() {
        return Err(bad());
    }
    Ok(MetaContextRequest { export, queries })
}

/// Payload of NBD_REP_META_CONTEXT: the context id, then its name.
pub fn encode_meta_context_reply(id: u32, name: &str) -> Vec<u8> {
    let mut out = id.to_be_bytes().to_vec();
    out.extend_from_slice(name.as_bytes());
    out
}

/// # Errors
/// `BadOptionPayload` under 4 bytes, `BadName` for a name not UTF-8.
pub fn decode_meta_context_reply(buf: &[u8]) -> ProtoResult<(u32, String)> {
    let id = be_u32(
        buf.get(..4)
            .ok_or(ProtoError::BadOptionPayload { len: buf.len() })?,
        0,
    );
    let name = std::str::from_utf8(&buf[4..]).map_err(|_| ProtoError::BadName)?;
    Ok((id, name.to_owned()))
}

/// Payload of NBD_REP_SERVER (an `NBD_OPT_LIST` entry): the name's
/// length, the name, then an optional description to the end.
#[must_use]
pub fn encode_list_entry(name: &str, description: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len() + description.len());
    out.extend_from_slice(&u32::try_from(name.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(description.as_bytes());
    out
}

/// # Errors
/// `BadOptionPayload` when the name's length runs past the payload,
/// `BadName` for a name or description not UTF-8.
pub fn decode_list_entry(buf: &[u8]) -> ProtoResult<(String, String)> {
    let bad = || ProtoError::BadOptionPayload { len: buf.len() };
    let len = be_u32(buf.get(..4).ok_or_else(bad)?, 0) as usize;
    let name = buf.get(4..4usize.saturating_add(len)).ok_or_else(bad)?;
    let description = &buf[4 + len..];
    let text = |b: &[u8]| {
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| ProtoError::BadName)
    };
    Ok((text(name)?, text(description)?))
}

/// Header of an option reply from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub len: u32,
}

pub fn encode_option_reply(option: u32, reply: u32, payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(payload);
}

pub fn decode_option_reply_header(buf: &[u8]) -> ProtoResult<OptionReplyHeader> {
    need(buf, OPTION_REPLY_HEADER_LEN)?;
    let magic = be_u64(buf, 0);
    if magic != REPLY_MAGIC {
        return Err(ProtoError::BadMagic {
            expected: REPLY_MAGIC,
            found: magic,
        });
    }
    Ok(OptionReplyHeader {
        option: be_u32(buf, 8),
        reply: be_u32(buf, 12),
        len: be_u32(buf, 16),
    })
}

/// `NBD_INFO_EXPORT` payload: size and transmission flags.
pub fn encode_info_export(size: u64, tflags: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&tflags.to_be_bytes());
    out
}

/// `NBD_INFO_BLOCK_SIZE` payload: minimum, preferred, maximum.
pub fn encode_info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(14);
    out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    out.extend_from_slice(&min.to_be_bytes());
    out.extend_from_slice(&preferred.to_be_bytes());
    out.extend_from_slice(&max.to_be_bytes());
    out
}

/// A decoded `NBD_REP_INFO` payload the client cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    Export { size: u64, tflags: u16 },
    BlockSize { min: u32, preferred: u32, max: u32 },
    Other(u16),
}

pub fn decode_info(buf: &[u8]) -> ProtoResult<Info> {
    need(buf, 2)?;
    match be_u16(buf, 0) {
        INFO_EXPORT => {
            if buf.len() != 12 {
                return Err(ProtoError::BadOptionPayload { len: buf.len() });
            }
            Ok(Info::Export {
                size: be_u64(buf, 2),
                tflags: be_u16(buf, 10),
            })
        }
        INFO_BLOCK_SIZE => {
            if buf.len() != 14 {
                return Err(ProtoError::BadOptionPayload { len: buf.len() });
            }
            Ok(Info::BlockSize {
                min: be_u32(buf, 2),
                preferred: be_u32(buf, 6),
                max: be_u32(buf, 10),
            })
        }
        other => Ok(Info::Other(other)),
    }
}

/// Reply to NBD_OPT_EXPORT_NAME: size, flags and (unless NO_ZEROES) 124 zeroes.
pub fn encode_export_name_reply(size: u64, tflags: u16, no_zeroes: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&tflags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

// ------------------------------------------------------------- transmission

/// A transmission-phase request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

pub fn encode_request(r: &Request, out: &mut Vec<u8>) {
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&r.flags.to_be_bytes());
    out.extend_from_slice(&r.command.to_be_bytes());
    out.extend_from_slice(&r.handle.to_be_bytes());
    out.extend_from_slice(&r.offset.to_be_bytes());
    out.extend_from_slice(&r.length.to_be_bytes());
}

pub fn decode_request(buf: &[u8]) -> ProtoResult<Request> {
    need(buf, REQUEST_LEN)?;
    let magic = be_u32(buf, 0);
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic {
            expected: u64::from(REQUEST_MAGIC),
            found: u64::from(magic),
        });
    }
    Ok(Request {
        flags: be_u16(buf, 4),
        command: be_u16(buf, 6),
        handle: be_u64(buf, 8),
        offset: be_u64(buf, 16),
        length: be_u32(buf, 24),
    })
}

/// Header of a simple reply (the data, for a successful READ, follows).
pub fn encode_simple_reply(error: u32, handle: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
}

/// A reply header as the client sees it: simple or structured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        handle: u64,
    },
    Structured {
        flags: u16,
        kind: u16,
        handle: u64,
        len: u32,
    },
}

/// Decodes a reply header. A simple reply needs 16 bytes, a structured one 20;
/// `Short` tells the caller how many to have buffered.
pub fn decode_reply_header(buf: &[u8]) -> ProtoResult<ReplyHeader> {
    need(buf, 4)?;
    match be_u32(buf, 0) {
        SIMPLE_REPLY_MAGIC => {
            need(buf, SIMPLE_REPLY_LEN)?;
            Ok(ReplyHeader::Simple {
                error: be_u32(buf, 4),
                handle: be_u64(buf, 8),
            })
        }
        STRUCTURED_REPLY_MAGIC => {
            need(buf, STRUCTURED_HEADER_LEN)?;
            Ok(ReplyHeader::Structured {
                flags: be_u16(buf, 4),
                kind: be_u16(buf, 6),
                handle: be_u64(buf, 8),
                len: be_u32(buf, 16),
            })
        }
        other => Err(ProtoError::BadMagic {
            expected: u64::from(SIMPLE_REPLY_MAGIC),
            found: u64::from(other),
        }),
    }
}

/// Header of one structured reply chunk; `len` counts the payload after it.
pub fn encode_structured_header(flags: u16, kind: u16, handle: u64, len: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// A complete `NBD_REPLY_TYPE_ERROR` chunk with the DONE flag and a message.
pub fn encode_structured_error(handle: u64, error: u32, msg: &str, out: &mut Vec<u8>) {
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    let len = u32::try_from(6 + msg.len()).unwrap_or(u32::MAX);
    encode_structured_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, len, out);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&u16::try_from(msg.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(msg);
}

/// A complete `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: `len` bytes at `offset`
/// read as zeros.
pub fn encode_offset_hole(flags: u16, handle: u64, offset: u64, len: u32, out: &mut Vec<u8>) {
    encode_structured_header(flags, REPLY_TYPE_OFFSET_HOLE, handle, 12, out);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// A complete `NBD_REPLY_TYPE_BLOCK_STATUS` chunk with the DONE flag:
/// context `id` and its (length, flags) descriptors.
pub fn encode_block_status(handle: u64, id: u32, descs: &[(u32, u32)], out: &mut Vec<u8>) {
    let len = u32::try_from(4 + 8 * descs.len()).unwrap_or(u32::MAX);
    encode_structured_header(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, handle, len, out);
    out.extend_from_slice(&id.to_be_bytes());
    for (l, f) in descs {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&f.to_be_bytes());
    }
}

/// The payload of a `NBD_REPLY_TYPE_BLOCK_STATUS` chunk: context id and
/// descriptors.
///
/// # Errors
/// `BadOptionPayload` unless the length is 4 + a positive multiple of 8
/// and every descriptor length is non-zero, as the spec demands.
pub fn decode_block_status(buf: &[u8]) -> ProtoResult<(u32, Vec<(u32, u32)>)> {
    let bad = ProtoError::BadOptionPayload { len: buf.len() };
    if buf.len() < 12 || !(buf.len() - 4).is_multiple_of(8) {
        return Err(bad);
    }
    let descs: Vec<(u32, u32)> = buf[4..]
        .chunks_exact(8)
        .map(|d| (be_u32(d, 0), be_u32(d, 4)))
        .collect();
    if descs.iter().any(|&(l, _)| l == 0) {
        return Err(bad);
    }
    Ok((be_u32(buf, 0), descs))
}

/// Printable name of a command, for logs.
pub fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "UNKNOWN",
    }
}

/// Printable name of an option, for logs.
pub fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "EXPORT_NAME",
        OPT_ABORT => "ABORT",
        OPT_LIST => "LIST",
        OPT_STARTTLS => "STARTTLS",
        OPT_INFO => "INFO",
        OPT_GO => "GO",
        OPT_STRUCTURED_REPLY => "STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "SET_META_CONTEXT",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn greeting_matches_spec_bytes() {
        let mut out = Vec::new();
        encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, &mut out);
        assert_eq!(&out[..8], b"NBDMAGIC");
        assert_eq!(&out[8..16], b"IHAVEOPT");
        assert_eq!(&out[16..], &[0, 3]);
        assert_eq!(decode_greeting(&out), Ok(3));
    }

    #[test]
    fn oldstyle_greeting_is_refused() {
        let mut out = b"NBDMAGIC".to_vec();
        out.extend_from_slice(&0x0000_4202_8186_1253_u64.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        assert!(matches!(
            decode_greeting(&out),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn request_layout_is_28_bytes_big_endian() {
        let r = Request {
            flags: 0,
            command: CMD_READ,
            handle: 0x0102_0304_0506_0708,
            offset: 4096,
            length: 512,
        };
        let mut out = Vec::new();
        encode_request(&r, &mut out);
        assert_eq!(
            out,
            [
                0x25, 0x60, 0x95, 0x13, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10,
                0, 0, 0, 2, 0
            ]
        );
        assert_eq!(decode_request(&out), Ok(r));
    }

    #[test]
    fn short_and_bad_requests_are_errors() {
        assert!(matches!(
            decode_request(&[0x25, 0x60]),
            Err(ProtoError::Short { need: 28, have: 2 })
        ));
        let mut bad = vec![0u8; 28];
        bad[0] = 0x67;
        assert!(matches!(
            decode_request(&bad),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn option_header_round_trip_and_limit() {
        let mut out = Vec::new();
        encode_option(OPT_GO, b"abc", &mut out);
        let h = decode_option_header(&out).expect("valid header");
        assert_eq!(
            h,
            OptionHeader {
                option: OPT_GO,
                len: 3
            }
        );
        let mut big = Vec::new();
        big.extend_from_slice(&IHAVEOPT.to_be_bytes());
        big.extend_from_slice(&OPT_GO.to_be_bytes());
        big.extend_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        assert!(matches!(
            decode_option_header(&big),
            Err(ProtoError::OptionTooLong { .. })
        ));
    }

    #[test]
    fn info_request_round_trip() {
        let r = InfoRequest {
            name: "golden".into(),
            infos: vec![INFO_BLOCK_SIZE, INFO_NAME],
        };
        let enc = encode_info_request(&r);
        // Spec layout: u32 name length, name, u16 count, u16 each.
        assert_eq!(&enc[..4], &[0, 0, 0, 6]);
        assert_eq!(&enc[4..10], b"golden");
        assert_eq!(&enc[10..], &[0, 2, 0, 3, 0, 1]);
        assert_eq!(decode_info_request(&enc), Ok(r));
    }

    #[test]
    fn malformed_info_requests_are_errors() {
        // Name length claims more than present.
        assert!(decode_info_request(&[0, 0, 0, 9, b'a', 0, 0]).is_err());
        // Count says one info but none follow.
        assert!(decode_info_request(&[0, 0, 0, 0, 0, 1]).is_err());
        // Too short to hold the fixed fields.
        assert!(decode_info_request(&[0, 0]).is_err());
        // Invalid UTF-8 name.
        assert_eq!(
            decode_info_request(&[0, 0, 0, 1, 0xff, 0, 0]),
            Err(ProtoError::BadName)
        );
    }

    #[test]
    fn info_payloads_round_trip() {
        let e = encode_info_export(1 << 30, TFLAG_HAS_FLAGS | TFLAG_READ_ONLY);
        assert_eq!(
            decode_info(&e),
            Ok(Info::Export {
                size: 1 << 30,
                tflags: 3
            })
        );
        let b = encode_info_block_size(1, 4096, MAX_REQUEST);
        assert_eq!(
            decode_info(&b),
            Ok(Info::BlockSize {
                min: 1,
                preferred: 4096,
                max: MAX_REQUEST
            })
        );
        assert!(decode_info(&e[..5]).is_err());
    }

    #[test]
    fn list_entries_round_trip_and_bad_ones_are_errors() {
        // The spec's layout: length, name, description.
        let e = encode_list_entry("deb", "herd proxy");
        assert_eq!(&e[..7], &[0, 0, 0, 3, b'd', b'e', b'b']);
        assert_eq!(
            decode_list_entry(&e),
            Ok(("deb".to_owned(), "herd proxy".to_owned()))
        );
        assert_eq!(
            decode_list_entry(&encode_list_entry("x", "")),
            Ok(("x".to_owned(), String::new()))
        );
        assert!(decode_list_entry(&[0, 0, 0, 9, b'a']).is_err());
        assert!(decode_list_entry(&[0, 0]).is_err());
        assert!(decode_list_entry(&[0xff, 0xff, 0xff, 0xff]).is_err());
        assert_eq!(
            decode_list_entry(&[0, 0, 0, 1, 0xff]),
            Err(ProtoError::BadName)
        );
    }

    #[test]
    fn option_reply_round_trip() {
        let mut out = Vec::new();
        encode_option_reply(OPT_LIST, REP_SERVER, b"xyz", &mut out);
        assert_eq!(&out[..8], &[0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]);
        let h = decode_option_reply_header(&out).expect("valid");
        assert_eq!(
            h,
            OptionReplyHeader {
                option: OPT_LIST,
                reply: REP_SERVER,
                len: 3
            }
        );
    }

    #[test]
    fn reply_headers_decode() {
        let mut s = Vec::new();
        encode_simple_reply(EINVAL, 7, &mut s);
        assert_eq!(
            decode_reply_header(&s),
            Ok(ReplyHeader::Simple {
                error: EINVAL,
                handle: 7
            })
        );
        let mut st = Vec::new();
        encode_structured_error(9, EPERM, "read-only", &mut st);
        assert_eq!(
            decode_reply_header(&st),
            Ok(ReplyHeader::Structured {
                flags: REPLY_FLAG_DONE,
                kind: REPLY_TYPE_ERROR,
                handle: 9,
                len: 6 + 9
            })
        );
        assert_eq!(&st[20..24], &EPERM.to_be_bytes());
        assert!(decode_reply_header(&[0x66, 0x8e, 0x33, 0xef, 0]).is_err());
        assert!(decode_reply_header(&[1, 2, 3, 4, 5]).is_err());
    }

    #[test]
    fn export_name_reply_zero_padding() {
        let mut a = Vec::new();
        encode_export_name_reply(10, 3, false, &mut a);
        assert_eq!(a.len(), 8 + 2 + 124);
        let mut b = Vec::new();
        encode_export_name_reply(10, 3, true, &mut b);
        assert_eq!(b.len(), 10);
    }

    #[test]
    fn meta_context_request_bytes() {
        // SET_META_CONTEXT for export "herd", one query "base:allocation",
        // laid out as proto.md gives it: name length, name, query count,
        // then each query's length and bytes.
        let mut wire = vec![0, 0, 0, 4];
        wire.extend_from_slice(b"herd");
        wire.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 15]);
        wire.extend_from_slice(b"base:allocation");
        let req = decode_meta_context_request(&wire).unwrap();
        assert_eq!(req.export, "herd");
        assert_eq!(req.queries, vec!["base:allocation".to_owned()]);
        assert_eq!(encode_meta_context_request(&req), wire);
        // Zero queries (LIST: "everything") and an empty export name.
        let none = decode_meta_context_request(&[0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        assert!(none.export.is_empty() && none.queries.is_empty());
        // A query running past the payload, a trailing byte, a count the
        // payload cannot hold, bad UTF-8: refused, never a panic.
        let bad = |b: &[u8]| decode_meta_context_request(b).unwrap_err();
        assert!(matches!(
            bad(&wire[..wire.len() - 1]),
            ProtoError::BadOptionPayload { .. }
        ));
        let mut long = wire.clone();
        long.push(0);
        assert!(matches!(bad(&long), ProtoError::BadOptionPayload { .. }));
        assert!(matches!(
            bad(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
            ProtoError::BadOptionPayload { .. }
        ));
        assert_eq!(bad(&[0, 0, 0, 1, 0xff, 0, 0, 0, 0]), ProtoError::BadName);
        assert!(matches!(bad(&[0, 0]), ProtoError::BadOptionPayload { .. }));
        // NBD_REP_META_CONTEXT: id then name.
        let rep = encode_meta_context_reply(1, "base:allocation");
        assert_eq!(&rep[..4], &[0, 0, 0, 1]);
        assert_eq!(&rep[4..], b"base:allocation");
        assert_eq!(
            decode_meta_context_reply(&rep).unwrap(),
            (1, "base:allocation".to_owned())
        );
        assert!(decode_meta_context_reply(&[0, 0]).is_err());
    }

    #[test]
    fn block_status_and_hole_chunks() {
        // NBD_REPLY_TYPE_BLOCK_STATUS: 20-byte structured header (DONE,
        // type 5, length 4 + 8n), context id, (length, flags) pairs.
        let mut out = Vec::new();
        encode_block_status(
            0x1122,
            7,
            &[(65536, 0), (4096, STATE_HOLE | STATE_ZERO)],
            &mut out,
        );
        assert_eq!(
            out,
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0x11, 0x22, 0, 0, 0,
                20, //
                0, 0, 0, 7, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 3
            ]
        );
        assert_eq!(
            decode_block_status(&out[20..]).unwrap(),
            (7, vec![(65536, 0), (4096, 3)])
        );
        // No descriptor, a partial one, a zero length: invalid by the spec.
        assert!(decode_block_status(&out[20..24]).is_err());
        assert!(decode_block_status(&out[20..30]).is_err());
        assert!(decode_block_status(&[0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 3]).is_err());
        // NBD_REPLY_TYPE_OFFSET_HOLE: length 12, offset, hole size.
        let mut hole = Vec::new();
        encode_offset_hole(REPLY_FLAG_DONE, 9, 1 << 20, 4096, &mut hole);
        assert_eq!(
            hole,
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 12, //
                0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0x10, 0
            ]
        );
        assert!(matches!(
            decode_reply_header(&hole).unwrap(),
            ReplyHeader::Structured {
                kind: REPLY_TYPE_OFFSET_HOLE,
                len: 12,
                ..
            }
        ));
    }
}
