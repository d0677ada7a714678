//! Holes and zeros through a tree of real herd daemons, read by real
//! clients: `qemu-img map` and `nbdinfo --map` at a leaf match the source
//! file's map, a whole-image `nbdcopy` and a full prefetch move only the
//! data chunks from the root, chunks of zeros are never stored, and the
//! metadata-context negotiation behaves as the NBD spec says.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    assert_same_file, data_chunk_bytes, have, nbdcopy, scratch, sparse_image, Herd, Peer,
};
use herd::nbd::proto;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const CHUNK: u64 = 64 * KIB;

/// The extents of `qemu-img map --output=json` as (start, length, data,
/// zero), adjacent equal entries merged.
fn qemu_map(target: &str) -> Vec<(u64, u64, bool, bool)> {
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "raw", target])
        .output()
        .expect("qemu-img map");
    assert!(
        out.status.success(),
        "qemu-img map {target}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("map json");
    let mut map: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in v.as_array().expect("map array") {
        let f = |k: &str| e[k].as_u64().expect("number");
        let b = |k: &str| e[k].as_bool().expect("bool");
        let (start, len, data, zero) = (f("start"), f("length"), b("data"), b("zero"));
        match map.last_mut() {
            Some(last) if last.2 == data && last.3 == zero && last.0 + last.1 == start => {
                last.1 += len;
            }
            _ => map.push((start, len, data, zero)),
        }
    }
    map
}

/// `nbdinfo --map` lines, whitespace normalised.
fn nbdinfo_map(url: &str) -> Vec<String> {
    let out = Command::new("nbdinfo")
        .args(["--map", url])
        .output()
        .expect("nbdinfo");
    assert!(
        out.status.success(),
        "nbdinfo --map {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// Bytes a file really occupies on disk.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks() * 512
}

fn tree(dir: &Path, img: &Path, leaf_extra: &[&str]) -> (Herd, Herd, Herd) {
    let chunk = ["--chunk-size", "64KiB"];
    let root = Herd::start(dir, "root", img.to_str().expect("utf8"), &chunk);
    let relay = Herd::start(dir, "relay", &root.url(), &chunk);
    let mut extra = chunk.to_vec();
    extra.extend_from_slice(leaf_extra);
    let leaf = Herd::start(dir, "leaf", &relay.url(), &extra);
    (root, relay, leaf)
}

#[test]
fn maps_and_copies_through_a_tree_match_the_sparse_source() {
    if !have("qemu-img") || !have("nbdinfo") || !have("nbdcopy") || !have("nbdkit") {
        return;
    }
    let dir = scratch("holes-map");
    let img = dir.join("sparse.img");
    let extents = [
        (0, MIB),
        (3 * MIB + 4 * KIB, 200 * KIB),
        (10 * MIB + 12 * KIB, 2 * MIB + 8 * KIB),
        (40 * MIB, 64 * KIB),
        (63 * MIB, MIB),
    ];
    let data = sparse_image(&img, 64 * MIB, &extents, &[]);
    let (root, relay, leaf) = tree(&dir, &img, &[]);

    // The leaf knows the holes of the source, granule for granule.
    let source = qemu_map(img.to_str().expect("utf8"));
    assert!(source.iter().any(|e| !e.2) && source.iter().any(|e| e.2));
    assert_eq!(qemu_map(&leaf.url()), source, "qemu-img map at the leaf");

    // nbdinfo prints the same map through the tree as from nbdkit's file
    // plugin serving the file itself.
    let sock = dir.join("nbdkit.sock");
    let _kit = Peer(
        Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&sock)
            .arg("file")
            .arg(&img)
            .stderr(Stdio::null())
            .spawn()
            .expect("nbdkit"),
    );
    common::wait_socket(&sock);
    let kit_map = nbdinfo_map(&format!("nbd+unix:///?socket={}", sock.display()));
    assert!(
        kit_map.iter().any(|l| l.ends_with("hole,zero")),
        "{kit_map:?}"
    );
    assert_eq!(
        nbdinfo_map(&leaf.url()),
        kit_map,
        "nbdinfo --map at the leaf"
    );

    // The root read only its data to build the manifest (SEEK_DATA).
    let want = data_chunk_bytes(&data, CHUNK as usize);
    assert_eq!(root.metric("herd_manifest_build_bytes_total"), want as f64);
    // A whole-image copy moves only the data chunks from the root.
    let out = dir.join("copy.raw");
    nbdcopy(&leaf.url(), &out);
    assert_same_file(&out, &data);
    assert_eq!(
        root.metric("herd_served_bytes_total"),
        want as f64,
        "bytes the root served for a copy of the sparse image"
    );
    assert_eq!(relay.metric("herd_upstream_read_bytes_total"), want as f64);
    // Nothing but data was stored on the way (give or take the file
    // system's own blocks for the extent tree).
    for h in ["root", "relay", "leaf"] {
        let stored = allocated(&dir.join(format!("{h}-cache/herd-cache.data")));
        assert!(
            stored <= want + CHUNK,
            "{h} stores {stored} bytes for {want} of data"
        );
    }
    assert_eq!(
        leaf.metric("herd_cache_chunks_zero"),
        (64 * MIB - want) as f64 / CHUNK as f64
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn prefetch_full_moves_only_data() {
    let dir = scratch("holes-prefetch");
    let img = dir.join("sparse.img");
    let extents = [(MIB, 3 * MIB + 4 * KIB), (20 * MIB + 8 * KIB, 400 * KIB)];
    let data = sparse_image(&img, 32 * MIB, &extents, &[]);
    let (root, _relay, leaf) = tree(&dir, &img, &["--prefetch", "full"]);
    leaf.wait_prefetched(Duration::from_secs(60));
    let want = data_chunk_bytes(&data, CHUNK as usize);
    assert_eq!(leaf.metric("herd_upstream_read_bytes_total"), want as f64);
    assert_eq!(root.metric("herd_served_bytes_total"), want as f64);
    let stored = allocated(&dir.join("leaf-cache/herd-cache.data"));
    assert!(
        stored <= want,
        "leaf stores {stored} bytes for {want} of data"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn zeros_from_a_parent_without_block_status_are_known_and_not_stored() {
    if !have("nbdkit") || !have("nbdcopy") || !have("qemu-img") {
        return;
    }
    let dir = scratch("holes-noextents");
    let img = dir.join("zeros.img");
    // Data, then 1 MiB of zeros written out (allocated), then data.
    let data = sparse_image(
        &img,
        4 * MIB,
        &[(0, MIB), (2 * MIB, 2 * MIB)],
        &[(MIB, MIB)],
    );
    let port = common::free_port();
    // `noextents`: nbdkit answers no block status, as a dumb parent would.
    let _kit = Peer(
        Command::new("nbdkit")
            .args(["-f", "-i", "127.0.0.1", "-p", &port.to_string()])
            .args(["--filter=noextents", "file"])
            .arg(&img)
            .stderr(Stdio::null())
            .spawn()
            .expect("nbdkit"),
    );
    common::wait_port(port);
    let chunk = ["--chunk-size", "64KiB"];
    let anchor = Herd::start(&dir, "anchor", &format!("nbd://127.0.0.1:{port}/"), &chunk);
    let child = Herd::start(&dir, "child", &anchor.url(), &chunk);
    let out = dir.join("copy.raw");
    nbdcopy(&child.url(), &out);
    assert_same_file(&out, &data);
    // The anchor learnt the zeros from the bytes (its manifest); neither
    // node fetched, served or stored them.
    assert_eq!(child.metric("herd_cache_chunks_zero"), 16.0);
    assert_eq!(anchor.metric("herd_served_bytes_total"), (3 * MIB) as f64);
    assert_eq!(
        child.metric("herd_upstream_read_bytes_total"),
        (3 * MIB) as f64
    );
    assert!(allocated(&dir.join("child-cache/herd-cache.data")) <= 3 * MIB + CHUNK);
    // Read directly, the zeros are zeros.
    let mut c = common::RawClient::connect(child.port, "herd");
    assert_eq!(c.read(MIB + 4096, 8192), vec![0u8; 8192]);
    // Allocated zeros are reported as zeros, not as a hole.
    let map = qemu_map(&child.url());
    assert!(
        map.contains(&(MIB, MIB, true, true)),
        "allocated zeros in {map:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_anchor_over_nbdkit_reads_only_the_data_by_its_block_status() {
    if !have("nbdkit") || !have("nbdcopy") {
        return;
    }
    let dir = scratch("holes-anchor");
    let img = dir.join("sparse.img");
    let data = sparse_image(&img, 16 * MIB, &[(2 * MIB + 4 * KIB, 300 * KIB)], &[]);
    let port = common::free_port();
    let _kit = Peer(
        Command::new("nbdkit")
            .args(["-f", "-i", "127.0.0.1", "-p", &port.to_string(), "file"])
            .arg(&img)
            .stderr(Stdio::null())
            .spawn()
            .expect("nbdkit"),
    );
    common::wait_port(port);
    let chunk = ["--chunk-size", "64KiB"];
    let anchor = Herd::start(&dir, "anchor", &format!("nbd://127.0.0.1:{port}/"), &chunk);
    let want = data_chunk_bytes(&data, CHUNK as usize);
    assert_eq!(want, 5 * CHUNK);
    assert_eq!(
        anchor.metric("herd_manifest_build_bytes_total"),
        want as f64
    );
    let out = dir.join("copy.raw");
    nbdcopy(&anchor.url(), &out);
    assert_same_file(&out, &data);
    assert_eq!(anchor.metric("herd_upstream_read_bytes_total"), want as f64);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Raw negotiation: greeting, client flags, then options.
fn negotiate(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("greeting");
    s.write_all(&3u32.to_be_bytes()).expect("flags");
    s
}

/// Sends one option and collects its replies up to the final one.
fn option(s: &mut TcpStream, opt: u32, payload: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let mut out = Vec::new();
    proto::encode_option(opt, payload, &mut out);
    s.write_all(&out).expect("send option");
    let mut replies = Vec::new();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).expect("option reply");
        let r = proto::decode_option_reply_header(&h).expect("reply header");
        let mut p = vec![0u8; r.len as usize];
        s.read_exact(&mut p).expect("payload");
        let last = r.reply == proto::REP_ACK || r.reply & proto::REP_FLAG_ERROR != 0;
        replies.push((r.reply, p));
        if last {
            return replies;
        }
    }
}

fn meta(export: &str, queries: &[&str]) -> Vec<u8> {
    proto::encode_meta_context_request(&proto::MetaContextRequest {
        export: export.into(),
        queries: queries.iter().map(|q| (*q).to_owned()).collect(),
    })
}

/// One structured reply chunk: (flags, type, handle, payload).
fn chunk(s: &mut TcpStream) -> (u16, u16, u64, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).expect("reply header");
    let proto::ReplyHeader::Structured {
        flags,
        kind,
        handle,
        len,
    } = proto::decode_reply_header(&h).expect("structured reply")
    else {
        panic!("simple reply after structured replies were negotiated");
    };
    let mut p = vec![0u8; len as usize];
    s.read_exact(&mut p).expect("chunk payload");
    (flags, kind, handle, p)
}

fn request(s: &mut TcpStream, command: u16, flags: u16, handle: u64, offset: u64, length: u32) {
    let mut out = Vec::new();
    proto::encode_request(
        &proto::Request {
            flags,
            command,
            handle,
            offset,
            length,
        },
        &mut out,
    );
    s.write_all(&out).expect("send request");
}

fn go(s: &mut TcpStream) {
    let req = proto::InfoRequest {
        name: "herd".into(),
        infos: vec![],
    };
    let r = option(s, proto::OPT_GO, &proto::encode_info_request(&req));
    assert_eq!(r.last().map(|r| r.0), Some(proto::REP_ACK));
}

#[test]
fn meta_contexts_and_block_status_follow_the_spec() {
    let dir = scratch("holes-wire");
    let img = dir.join("sparse.img");
    let data = sparse_image(&img, 4 * MIB, &[(MIB, 64 * KIB)], &[]);
    let root = Herd::start(
        &dir,
        "root",
        img.to_str().expect("utf8"),
        &["--chunk-size", "64KiB"],
    );

    // Before structured replies, SET is refused (and selects nothing).
    let mut s = negotiate(root.port);
    let r = option(
        &mut s,
        proto::OPT_SET_META_CONTEXT,
        &meta("herd", &["base:allocation"]),
    );
    assert_eq!(r, vec![(proto::REP_ERR_INVALID, r[0].1.clone())]);
    let r = option(&mut s, proto::OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(r[0].0, proto::REP_ACK);
    // LIST with no query lists base:allocation, id 0.
    let r = option(&mut s, proto::OPT_LIST_META_CONTEXT, &meta("herd", &[]));
    assert_eq!(r.len(), 2);
    assert_eq!(
        proto::decode_meta_context_reply(&r[0].1).expect("context"),
        (0, "base:allocation".to_owned())
    );
    // Unknown export: the error a client expects.
    let r = option(
        &mut s,
        proto::OPT_SET_META_CONTEXT,
        &meta("nope", &["base:allocation"]),
    );
    assert_eq!(r[0].0, proto::REP_ERR_UNKNOWN);
    // Unknown contexts: no context selected, not an error.
    let r = option(
        &mut s,
        proto::OPT_SET_META_CONTEXT,
        &meta("herd", &["x-foo:bar", "base:"]),
    );
    assert_eq!(r, vec![(proto::REP_ACK, vec![])]);
    go(&mut s);
    // BLOCK_STATUS without a context: EINVAL, and the connection goes on.
    request(&mut s, proto::CMD_BLOCK_STATUS, 0, 1, 0, 4096);
    let (flags, kind, handle, p) = chunk(&mut s);
    assert_eq!(
        (flags, kind, handle),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_ERROR, 1)
    );
    assert_eq!(&p[..4], &proto::EINVAL.to_be_bytes());
    // A READ of data then hole: OFFSET_DATA, then OFFSET_HOLE, no zeros sent.
    request(&mut s, proto::CMD_READ, 0, 2, MIB, 128 * 1024);
    let (flags, kind, _, p) = chunk(&mut s);
    assert_eq!((flags, kind), (0, proto::REPLY_TYPE_OFFSET_DATA));
    assert_eq!(&p[..8], &MIB.to_be_bytes());
    assert_eq!(&p[8..], &data[MIB as usize..(MIB + 64 * KIB) as usize]);
    let (flags, kind, _, p) = chunk(&mut s);
    assert_eq!(
        (flags, kind),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_HOLE)
    );
    assert_eq!(
        &p[..],
        &[
            &(MIB + 64 * KIB).to_be_bytes()[..],
            &(64u32 << 10).to_be_bytes()
        ]
        .concat()
    );
    drop(s);

    // Selected: BLOCK_STATUS answers from the manifest.
    let mut s = negotiate(root.port);
    option(&mut s, proto::OPT_STRUCTURED_REPLY, &[]);
    let r = option(
        &mut s,
        proto::OPT_SET_META_CONTEXT,
        &meta("herd", &["base:allocation"]),
    );
    assert_eq!(r.len(), 2);
    let (id, name) = proto::decode_meta_context_reply(&r[0].1).expect("context");
    assert_eq!(name, "base:allocation");
    go(&mut s);
    request(&mut s, proto::CMD_BLOCK_STATUS, 0, 3, 0, 4 * MIB as u32);
    let (flags, kind, handle, p) = chunk(&mut s);
    assert_eq!(
        (flags, kind, handle),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_BLOCK_STATUS, 3)
    );
    let hole = proto::STATE_HOLE | proto::STATE_ZERO;
    assert_eq!(
        proto::decode_block_status(&p).expect("status"),
        (
            id,
            vec![
                (MIB as u32, hole),
                (64 << 10, 0),
                ((3 * MIB - 64 * KIB) as u32, hole)
            ]
        )
    );
    // REQ_ONE: one descriptor, within the request.
    request(
        &mut s,
        proto::CMD_BLOCK_STATUS,
        proto::CMD_FLAG_REQ_ONE,
        4,
        MIB - 4096,
        1 << 20,
    );
    let (_, _, _, p) = chunk(&mut s);
    assert_eq!(
        proto::decode_block_status(&p).expect("status").1,
        vec![(4096, hole)]
    );
    // Past the end: EINVAL, connection kept.
    request(&mut s, proto::CMD_BLOCK_STATUS, 0, 5, 4 * MIB - 4096, 8192);
    assert_eq!(chunk(&mut s).1, proto::REPLY_TYPE_ERROR);
    request(&mut s, proto::CMD_BLOCK_STATUS, 0, 6, 0, 4096);
    assert_eq!(chunk(&mut s).1, proto::REPLY_TYPE_BLOCK_STATUS);
    let _ = std::fs::remove_dir_all(&dir);
}
