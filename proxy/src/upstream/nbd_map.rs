//! Where an NBD server's image holds data: its `base:allocation` block
//! status, read once on a connection of its own when a trust anchor over a
//! server that is not herd (qemu-nbd, nbdkit) builds the manifest, so the
//! anchor reads only the data. The data pool keeps simple replies; inside
//! a herd tree the manifest carries the map, so no node asks this.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::nbd::{go, options, read_option_reply, send_abort, send_option};
use super::{Extents, UpstreamError, UpstreamResult, UpstreamUrl};
use crate::nbd::proto::{self, MetaContextRequest, Request};
use crate::net::BoxStream;

/// Bytes asked per BLOCK_STATUS request.
const STEP: u64 = 1 << 30;
/// Largest reply chunk accepted: the spec's 2^20 descriptors.
const MAX_CHUNK: u32 = 4 + 8 * (1 << 20);

/// The data extents of `url`'s export of `size` bytes by its block status;
/// `Ok(None)` when the server offers none (then everything may be data).
///
/// # Errors
/// Connection, handshake or protocol failures.
pub async fn extents(url: &UpstreamUrl, size: u64) -> UpstreamResult<Extents> {
    let (addr, export) = match url {
        UpstreamUrl::NbdTcp { export, .. } | UpstreamUrl::NbdUnix { export, .. } => {
            (url.to_string(), export.clone())
        }
        UpstreamUrl::File(_) | UpstreamUrl::Iscsi { .. } => return Ok(None),
    };
    let fail = |reason: String| UpstreamError::Handshake {
        addr: addr.clone(),
        reason,
    };
    let io = |e: std::io::Error| fail(format!("I/O error: {e}"));
    let mut s = options(url, &addr).await?;
    if option(&mut s, proto::OPT_STRUCTURED_REPLY, &[], &addr)
        .await?
        .is_none()
    {
        return abort(s, &addr, "no structured replies").await;
    }
    let req = MetaContextRequest {
        export: export.clone(),
        queries: vec![proto::CONTEXT_BASE_ALLOCATION.to_owned()],
    };
    let payload = proto::encode_meta_context_request(&req);
    let Some(replies) = option(&mut s, proto::OPT_SET_META_CONTEXT, &payload, &addr).await? else {
        return abort(s, &addr, "no metadata contexts").await;
    };
    let id = replies
        .iter()
        .filter_map(|p| proto::decode_meta_context_reply(p).ok())
        .find(|(_, name)| name == proto::CONTEXT_BASE_ALLOCATION)
        .map(|(id, _)| id);
    let Some(id) = id else {
        return abort(s, &addr, "no base:allocation").await;
    };
    go(&mut s, &export, &addr).await?;
    let mut data: Vec<(u64, u64)> = Vec::new();
    let mut at = 0u64;
    let mut handle = 0u64;
    while at < size {
        handle += 1;
        let len = u32::try_from((size - at).min(STEP)).unwrap_or(u32::MAX);
        let mut out = Vec::with_capacity(proto::REQUEST_LEN);
        proto::encode_request(
            &Request {
                flags: 0,
                command: proto::CMD_BLOCK_STATUS,
                handle,
                offset: at,
                length: len,
            },
            &mut out,
        );
        s.write_all(&out).await.map_err(io)?;
        let descs = status_reply(&mut s, handle, id).await.map_err(io)?;
        let before = at;
        for (l, flags) in descs {
            let l = u64::from(l).min(size - at);
            if flags & proto::STATE_HOLE == 0 {
                match data.last_mut() {
                    Some((o, n)) if *o + *n == at => *n += l,
                    _ => data.push((at, l)),
                }
            }
            at += l;
            if at >= size {
                break;
            }
        }
        if at == before {
            return Err(fail("block status made no progress".into()));
        }
    }
    let mut out = Vec::new();
    proto::encode_request(
        &Request {
            flags: 0,
            command: proto::CMD_DISC,
            handle: 0,
            offset: 0,
            length: 0,
        },
        &mut out,
    );
    let _ = s.write_all(&out).await;
    tracing::info!(
        server = %addr,
        extents = data.len(),
        data_bytes = data.iter().map(|e| e.1).sum::<u64>(),
        "allocation from the server's block status"
    );
    Ok(Some(data))
}

async fn abort(mut s: BoxStream, addr: &str, why: &str) -> UpstreamResult<Extents> {
    send_abort(&mut s).await;
    tracing::info!(server = %addr, why, "server gives no block status; reading all of the image");
    Ok(None)
}

/// Sends an option; `Some(payloads of the replies before the ACK)`, or
/// `None` if the server refused it.
async fn option(
    s: &mut BoxStream,
    opt: u32,
    payload: &[u8],
    addr: &str,
) -> UpstreamResult<Option<Vec<Vec<u8>>>> {
    send_option(s, opt, payload, addr).await?;
    let mut replies = Vec::new();
    loop {
        let (reply, p) = read_option_reply(s, addr).await?;
        if reply == proto::REP_ACK {
            return Ok(Some(replies));
        }
        if reply & proto::REP_FLAG_ERROR != 0 {
            return Ok(None);
        }
        replies.push(p);
    }
}

/// Reads the structured reply to BLOCK_STATUS `handle`: the descriptors
/// of context `id`.
async fn status_reply(s: &mut BoxStream, handle: u64, id: u32) -> std::io::Result<Vec<(u32, u32)>> {
    let bad = |why: &str| std::io::Error::other(format!("block status reply: {why}"));
    let mut descs = Vec::new();
    loop {
        let mut h = [0u8; proto::STRUCTURED_HEADER_LEN];
        s.read_exact(&mut h).await?;
        let proto::ReplyHeader::Structured {
            flags,
            kind,
            handle: got,
            len,
        } = proto::decode_reply_header(&h).map_err(std::io::Error::other)?
        else {
            return Err(bad("a simple reply"));
        };
        if got != handle || len > MAX_CHUNK {
            return Err(bad("wrong handle or oversized"));
        }
        let mut p = vec![0u8; len as usize];
        s.read_exact(&mut p).await?;
        match kind {
            proto::REPLY_TYPE_BLOCK_STATUS => {
                let (cid, d) = proto::decode_block_status(&p).map_err(std::io::Error::other)?;
                if cid == id {
                    descs = d;
                }
            }
            proto::REPLY_TYPE_ERROR | proto::REPLY_TYPE_ERROR_OFFSET => {
                return Err(bad("the server answered an error"));
            }
            _ => {}
        }
        if flags & proto::REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    if descs.is_empty() {
        return Err(bad("no descriptors"));
    }
    Ok(descs)
}
