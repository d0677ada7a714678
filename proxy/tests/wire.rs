//! Raw NBD bytes against a real herd daemon: refusals, limits, pipelining,
//! negotiation options, and malformed input that must close only the
//! offending connection.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;

use common::{random_image, scratch, Herd, RawClient};
use herd::nbd::proto;

const MIB: usize = 1 << 20;

fn root(name: &str, size: usize) -> (std::path::PathBuf, Vec<u8>, Herd) {
    root_with(name, size, &["--export-name", "golden"])
}

/// A root over a fresh random image of `size` bytes, started with `extra`.
fn root_with(name: &str, size: usize, extra: &[&str]) -> (std::path::PathBuf, Vec<u8>, Herd) {
    let dir = scratch(name);
    let img = dir.join("golden.img");
    let data = random_image(&img, size);
    let h = Herd::start(&dir, "root", img.to_str().expect("utf8"), extra);
    (dir, data, h)
}

#[test]
fn writes_are_refused_and_bad_ranges_keep_the_connection() {
    let (_dir, data, h) = root("refusals", 4 * MIB);
    let mut c = RawClient::connect(h.port, "golden");
    assert_eq!(c.size, data.len() as u64);
    c.send(proto::CMD_WRITE, 1, 0, 512, &[0xaa; 512]);
    assert_eq!(c.reply(|_| 0).1, proto::EPERM);
    c.send(proto::CMD_TRIM, 2, 0, 512, &[]);
    assert_eq!(c.reply(|_| 0).1, proto::EPERM);
    c.send(proto::CMD_WRITE_ZEROES, 3, 0, 512, &[]);
    assert_eq!(c.reply(|_| 0).1, proto::EPERM);
    c.send(proto::CMD_READ, 4, data.len() as u64 - 10, 11, &[]);
    assert_eq!(c.reply(|_| 0).1, proto::EINVAL, "read past the end");
    c.send(proto::CMD_READ, 5, u64::MAX - 1, 4096, &[]);
    assert_eq!(c.reply(|_| 0).1, proto::EINVAL, "offset overflow");
    c.send(proto::CMD_READ, 6, 0, proto::MAX_REQUEST + 1, &[]);
    assert_eq!(c.reply(|_| 0).1, proto::EINVAL, "oversized read");
    c.send(proto::CMD_BLOCK_STATUS, 7, 0, 4096, &[]);
    assert_eq!(
        c.reply(|_| 0).1,
        proto::EINVAL,
        "no meta context negotiated"
    );
    c.send(99, 8, 0, 0, &[]);
    assert_eq!(c.reply(|_| 0).1, proto::EINVAL, "unknown command");
    c.send(proto::CMD_FLUSH, 9, 0, 0, &[]);
    assert_eq!(c.reply(|_| 0), (9, 0, vec![]));
    c.send(proto::CMD_CACHE, 10, MIB as u64, MIB as u32, &[]);
    assert_eq!(c.reply(|_| 0), (10, 0, vec![]));
    // Still in sync after all of that, and the image is unchanged.
    c.send(proto::CMD_READ, 11, 0, 512, &[]);
    let (hd, err, got) = c.reply(|_| 512);
    assert_eq!((hd, err), (11, 0));
    assert_eq!(got, data[..512]);
    // The CACHE hint fetched chunk 1 without a read.
    assert_eq!(h.metric_eventually("herd_cache_chunks_present", 2.0), 2.0);
    c.send(proto::CMD_DISC, 12, 0, 0, &[]);
    let mut rest = Vec::new();
    let _ = c.s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "server closes after DISC");
}

#[test]
fn pipelined_reads_are_all_answered_correctly() {
    let (_dir, data, h) = root("pipeline", 16 * MIB);
    let mut c = RawClient::connect(h.port, "");
    // 64 reads in flight at once across all chunks, sizes varying.
    let reqs: Vec<(u64, u64, u32)> = (0..64u64)
        .map(|i| {
            (
                i,
                (i * 997 * 4096 + i * 13) % (15 * MIB as u64),
                4096 + (i as u32 % 7) * 65536,
            )
        })
        .collect();
    for &(hd, off, len) in &reqs {
        c.send(proto::CMD_READ, hd, off, len, &[]);
    }
    let mut order = Vec::new();
    for _ in 0..reqs.len() {
        let (hd, err, got) = c.reply(|hd| reqs[hd as usize].2 as usize);
        assert_eq!(err, 0);
        let (_, off, len) = reqs[hd as usize];
        let off = off as usize;
        assert_eq!(got, data[off..off + len as usize], "handle {hd}");
        order.push(hd);
    }
    order.sort_unstable();
    assert_eq!(
        order,
        (0..64).collect::<Vec<_>>(),
        "every handle answered once"
    );
}

#[test]
fn each_connection_is_served_on_the_connection_thread_with_fewest() {
    let (_dir, data, h) = root_with("cores", 4 * MIB, &["--workers", "2"]);
    let core = |i: usize| format!("herd_core_connections{{core=\"{i}\"}}");
    // The start's readiness probe was a connection too: it is counted out
    // once its task sees the probe hang up.
    h.metric_eventually(&core(0), 0.0);
    h.metric_eventually(&core(1), 0.0);
    // Placed at accept: three connections go 0, 1, 0.
    let mut clients: Vec<RawClient> = (0..3).map(|_| RawClient::connect(h.port, "")).collect();
    assert_eq!(
        h.metric(&core(0)),
        2.0,
        "core 0 should hold connections 1 and 3"
    );
    assert_eq!(h.metric(&core(1)), 1.0, "core 1 should hold connection 2");
    for (i, c) in clients.iter_mut().enumerate() {
        let off = i * MIB + 4096;
        c.send(proto::CMD_READ, i as u64, off as u64, 4096, &[]);
        let (hd, err, got) = c.reply(|_| 4096);
        assert_eq!((hd, err), (i as u64, 0));
        assert_eq!(got, data[off..off + 4096], "connection {i}");
    }
    // A connection that ends is counted out of its core, and the next one
    // takes the place it left (turn by turn it would go to core 1).
    drop(clients.remove(0));
    h.metric_eventually(&core(0), 1.0);
    clients.push(RawClient::connect(h.port, ""));
    assert_eq!((h.metric(&core(0)), h.metric(&core(1))), (2.0, 1.0));
}

/// QD1 reads, every byte checked, then the spin counters (request, idle,
/// microseconds).
fn qd1_reads(spin_us: &str) -> (f64, f64, f64) {
    let (_dir, data, h) = root_with(&format!("spin-{spin_us}"), 4 * MIB, &["--spin-us", spin_us]);
    let mut c = RawClient::connect(h.port, "");
    for i in 0..2000u64 {
        let off = (i * 4096 * 37) % (4 * MIB as u64 - 4096);
        c.send(proto::CMD_READ, i, off, 4096, &[]);
        let (hd, err, got) = c.reply(|_| 4096);
        assert_eq!((hd, err), (i, 0));
        assert_eq!(got, data[off as usize..off as usize + 4096], "read {i}");
    }
    h.spins("herd_export")
}

#[test]
fn a_client_reading_back_to_back_is_spun_for_and_spin_off_never_spins() {
    // The widest window: a loaded test machine may take a while to run
    // the client between a reply and its next request.
    let (request, idle, us) = qd1_reads("1000");
    assert!(
        request > 0.0,
        "no request arrived while spinning ({idle} idle spins)"
    );
    assert!(us > 0.0, "spin time not counted");
    assert_eq!(qd1_reads("0"), (0.0, 0.0, 0.0), "--spin-us 0 still spun");
}

#[test]
fn large_cached_reads_leave_zero_copy_in_order_and_intact() {
    let (_dir, data, h) = root("zerocopy", 8 * MIB);
    let mut c = RawClient::connect(h.port, "golden");
    // Cold: every chunk is fetched (a copy path), then marked present.
    // Backwards, so no read looks sequential and earns read-ahead.
    for off in (0..data.len()).step_by(MIB).rev() {
        assert_eq!(c.read(off as u64, MIB as u32), data[off..off + MIB]);
    }
    // 8 MiB in 1 MiB chunks.
    assert_eq!(h.metric_eventually("herd_cache_chunks_present", 8.0), 8.0);
    // Written past the page cache: the next reads come from disk, copied,
    // and bring the chunks into the page cache.
    for off in (0..data.len()).step_by(MIB).rev() {
        assert_eq!(c.read(off as u64, MIB as u32), data[off..off + MIB]);
    }
    assert_eq!(h.metric("herd_served_zero_copy_bytes_total"), 0.0);
    // Warm: large reads at odd offsets, across chunk boundaries, pipelined
    // with small ones whose replies are buffered: replies must still come
    // whole, in a stream the client can parse, with the right bytes.
    let reqs: Vec<(u64, u32)> = (0..40u64)
        .map(|i| {
            let len = if i % 2 == 0 {
                64 << 10 << (i % 5)
            } else {
                512 + i as u32
            };
            let off = (i * 191_237 + 4093) % (data.len() as u64 - u64::from(len));
            (off, len)
        })
        .collect();
    for (hd, &(off, len)) in reqs.iter().enumerate() {
        c.send(proto::CMD_READ, hd as u64, off, len, &[]);
    }
    let mut large = 0u64;
    for _ in 0..reqs.len() {
        let (hd, err, got) = c.reply(|hd| reqs[hd as usize].1 as usize);
        assert_eq!(err, 0);
        let (off, len) = reqs[hd as usize];
        let off = off as usize;
        assert_eq!(got, data[off..off + len as usize], "handle {hd}");
        if len >= 64 << 10 {
            large += u64::from(len);
        }
    }
    assert_eq!(
        h.metric("herd_served_zero_copy_bytes_total"),
        large as f64,
        "every large warm read was sendfile'd"
    );
}

#[test]
fn large_hits_are_copied_while_two_local_clients_stream_and_sendfiled_otherwise() {
    // (hit_send, a lone client's hits copied?, hits copied while another
    // client's are queued?)
    for (mode, alone, shared) in [
        ("auto", false, true),
        ("sendfile", false, false),
        ("copy", true, true),
    ] {
        let (_dir, data, h) = root_with(
            &format!("hit-send-{mode}"),
            8 * MIB,
            &["--export-name", "golden", "--hit-send", mode],
        );
        let mut a = RawClient::connect(h.port, "golden");
        // Fetched (written past the page cache), then read into it.
        for _ in 0..2 {
            for off in (0..data.len()).step_by(MIB).rev() {
                assert_eq!(a.read(off as u64, MIB as u32), data[off..off + MIB]);
            }
        }
        let copied = || h.metric("herd_served_hit_copy_bytes_total");
        let spliced = || h.metric("herd_served_zero_copy_bytes_total");
        assert_eq!((copied(), spliced()), (0.0, 0.0), "{mode}: cold reads");
        // One client alone.
        for off in (0..4 * MIB).step_by(MIB) {
            assert_eq!(a.read(off as u64, MIB as u32), data[off..off + MIB]);
        }
        // A hit's bytes are counted before it stops counting as queued.
        let streams = |n: f64| h.metric_eventually("herd_nbd_local_streams", n);
        assert_eq!(streams(0.0), 0.0, "{mode}");
        let lone = (4 * MIB) as f64;
        let (c0, s0) = if alone { (lone, 0.0) } else { (0.0, lone) };
        assert_eq!((copied(), spliced()), (c0, s0), "{mode}: one client");
        // A asks for far more than the sockets hold and reads none of it,
        // so its hits stay queued while B reads.
        let queued = 32;
        for hd in 0..queued {
            let off = (hd % 8) * MIB as u64;
            a.send(proto::CMD_READ, hd, off, MIB as u32, &[]);
        }
        // Counted in every mode: the gauge says A is streaming.
        assert_eq!(streams(1.0), 1.0, "{mode}");
        let mut b = RawClient::connect(h.port, "golden");
        for off in (0..4 * MIB).step_by(MIB).rev() {
            assert_eq!(b.read(off as u64, MIB as u32), data[off..off + MIB]);
        }
        assert_eq!(streams(1.0), 1.0, "{mode}: B done, A still queued");
        // A's writer may still have been filling its socket when B came:
        // replies it began then were copied too.
        let beside = copied() - c0;
        if shared {
            assert!(beside >= lone, "{mode}: B's hits beside A's: {beside}");
        } else {
            assert_eq!(beside, 0.0, "{mode}: B's hits beside A's");
        }
        // Below COPY_MIN, auto sends B's hits by sendfile even beside A's.
        // A's writer must first be stuck on its full socket, so that only
        // B's hits move the counters: none of A's completes in 100 ms.
        let sent = || copied() + spliced();
        let stuck = (0..50).any(|_| {
            let before = sent();
            std::thread::sleep(std::time::Duration::from_millis(100));
            sent() == before
        });
        assert!(stuck, "{mode}: A's replies kept leaving for 5 s unread");
        let small = 64 << 10;
        let (c1, s1) = (copied(), spliced());
        for off in (0..4 * small).step_by(small) {
            assert_eq!(b.read(off as u64, small as u32), data[off..off + small]);
        }
        // A hit is counted once sent, which can be after B has it: wait
        // for the counter it should move, then check the other did not.
        let smalls = (4 * small) as f64;
        let (c2, s2) = if mode == "copy" {
            let c2 = h.metric_eventually("herd_served_hit_copy_bytes_total", c1 + smalls);
            (c2, spliced())
        } else {
            let s2 = h.metric_eventually("herd_served_zero_copy_bytes_total", s1 + smalls);
            (copied(), s2)
        };
        let want = if mode == "copy" {
            (smalls, 0.0)
        } else {
            (0.0, smalls)
        };
        assert_eq!(
            (c2 - c1, s2 - s1),
            want,
            "{mode}: B's 64 KiB hits beside A's"
        );
        drop(b);
        // A's replies come whole and right, however each one left.
        for _ in 0..queued {
            let (hd, err, got) = a.reply(|_| MIB);
            assert_eq!(err, 0);
            let off = (hd as usize % 8) * MIB;
            assert_eq!(got, data[off..off + MIB], "{mode}: handle {hd}");
        }
        assert_eq!(streams(0.0), 0.0, "{mode}");
        let total = (8 + 32) as f64 * MIB as f64 + smalls;
        assert_eq!(
            copied() + spliced(),
            total,
            "{mode}: every warm read counted once"
        );
    }
}

#[test]
fn direct_cache_writes_leave_the_page_cache_alone_and_buffered_ones_fill_it() {
    for (mode, other, resident) in [("direct", "buffered", false), ("buffered", "direct", true)] {
        // 8 MiB read whole, a ninth chunk by a small read.
        let (dir, data, h) = root_with(
            &format!("writes-{mode}"),
            9 * MIB,
            &["--export-name", "golden", "--cache-writes", mode],
        );
        let whole = 8 * MIB;
        let mut c = RawClient::connect(h.port, "golden");
        for off in (0..whole).step_by(MIB).rev() {
            assert_eq!(c.read(off as u64, MIB as u32), data[off..off + MIB]);
        }
        assert_eq!(h.metric_eventually("herd_cache_chunks_present", 8.0), 8.0);
        let written =
            |m: &str| h.metric(&format!("herd_cache_written_bytes_total{{mode=\"{m}\"}}"));
        assert_eq!(written(mode), whole as f64, "{mode}");
        assert_eq!(written(other), 0.0, "{mode}");
        let file = std::fs::File::open(dir.join("root-cache").join(herd::cache::DATA_FILE))
            .expect("cache data file");
        let cached = |off: usize, len: usize| {
            herd::io::pagecache::is_resident(&file, off as u64, len as u64)
        };
        assert_eq!(
            cached(0, whole),
            resident,
            "{mode}: whole reads' chunks in the page cache"
        );
        // A small read's chunk goes through the page cache either way: its
        // neighbours are likely read next.
        let off = whole + 4096;
        assert_eq!(c.read(off as u64, 4096), data[off..off + 4096]);
        assert_eq!(h.metric_eventually("herd_cache_chunks_present", 9.0), 9.0);
        assert_eq!(
            written("buffered"),
            (9 * MIB - if resident { 0 } else { whole }) as f64
        );
        assert!(cached(whole, MIB), "{mode}: the small read's chunk");
        // Either way the cache serves the image, and a read brings it in.
        for off in (0..whole).step_by(MIB) {
            assert_eq!(c.read(off as u64, MIB as u32), data[off..off + MIB]);
        }
        assert!(cached(0, whole), "{mode}");
    }
}

#[test]
fn a_read_over_fetched_runs_and_a_cached_chunk_comes_back_whole() {
    let (_dir, data, h) = root("pieces", 4 * MIB);
    let mut c = RawClient::connect(h.port, "golden");
    assert_eq!(c.read(MIB as u64, MIB as u32), data[MIB..2 * MIB]);
    assert_eq!(h.metric_eventually("herd_cache_chunks_present", 1.0), 1.0);
    // Chunk 0 (three quarters of its run: shared), chunk 1 (from disk),
    // chunk 2 (a quarter of its run: copied), in one reply.
    let (off, len) = (MIB / 4, 2 * MIB);
    assert_eq!(c.read(off as u64, len as u32), data[off..off + len]);
    assert_eq!(h.metric("herd_chunk_misses_total"), 3.0);
}

#[test]
fn negotiation_options_follow_the_spec() {
    let (_dir, data, h) = root("options", MIB);
    let mut s = TcpStream::connect(("127.0.0.1", h.port)).expect("connect");
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("greeting");
    assert_eq!(
        proto::decode_greeting(&g),
        Ok(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES)
    );
    s.write_all(&proto::FLAG_C_FIXED_NEWSTYLE.to_be_bytes())
        .expect("flags");
    let opt = |s: &mut TcpStream, o: u32, payload: &[u8]| {
        let mut out = Vec::new();
        proto::encode_option(o, payload, &mut out);
        s.write_all(&out).expect("send option");
    };
    let read_reply = |s: &mut TcpStream| {
        let mut hd = [0u8; 20];
        s.read_exact(&mut hd).expect("reply");
        let r = proto::decode_option_reply_header(&hd).expect("header");
        let mut p = vec![0u8; r.len as usize];
        s.read_exact(&mut p).expect("payload");
        (r, p)
    };
    // LIST: the image (its latest version), that version pinned by
    // identity, and the manifest, each with a description; then ACK.
    opt(&mut s, proto::OPT_LIST, &[]);
    let entry = |s: &mut TcpStream| {
        let (r, p) = read_reply(s);
        assert_eq!(r.reply, proto::REP_SERVER);
        proto::decode_list_entry(&p).expect("a list entry")
    };
    let (name, description) = entry(&mut s);
    assert_eq!(name, "golden");
    assert!(description.contains("identity="), "{description}");
    let (version, same) = entry(&mut s);
    assert!(version.starts_with("golden@"), "{version}");
    assert_eq!(same, description);
    assert_eq!(entry(&mut s).0, "herd-manifest");
    assert_eq!(read_reply(&mut s).0.reply, proto::REP_ACK);
    // Unknown option: ERR_UNSUP, negotiation continues.
    opt(&mut s, 42, b"x");
    assert_eq!(read_reply(&mut s).0.reply, proto::REP_ERR_UNSUP);
    // INFO for a missing export: ERR_UNKNOWN.
    let missing = proto::encode_info_request(&proto::InfoRequest {
        name: "nope".into(),
        infos: vec![],
    });
    opt(&mut s, proto::OPT_INFO, &missing);
    assert_eq!(read_reply(&mut s).0.reply, proto::REP_ERR_UNKNOWN);
    // INFO with BLOCK_SIZE: export info, block size, ACK.
    let info = proto::encode_info_request(&proto::InfoRequest {
        name: "golden".into(),
        infos: vec![proto::INFO_BLOCK_SIZE],
    });
    opt(&mut s, proto::OPT_INFO, &info);
    let mut saw_block = false;
    let mut saw_size = false;
    loop {
        let (r, p) = read_reply(&mut s);
        if r.reply == proto::REP_ACK {
            break;
        }
        match proto::decode_info(&p).expect("info") {
            proto::Info::Export { size, tflags } => {
                saw_size = size == data.len() as u64;
                assert!(tflags & proto::TFLAG_READ_ONLY != 0);
            }
            proto::Info::BlockSize {
                min,
                preferred,
                max,
            } => {
                saw_block = (min, preferred, max) == (1, 4096, proto::MAX_REQUEST);
            }
            proto::Info::Other(_) => {}
        }
    }
    assert!(saw_block && saw_size);
    // STRUCTURED_REPLY, then EXPORT_NAME enters transmission.
    opt(&mut s, proto::OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(read_reply(&mut s).0.reply, proto::REP_ACK);
    opt(&mut s, proto::OPT_EXPORT_NAME, b"golden");
    let mut er = [0u8; 134];
    s.read_exact(&mut er).expect("export name reply");
    assert_eq!(
        u64::from_be_bytes(er[..8].try_into().expect("8")),
        data.len() as u64
    );
    // A structured READ reply: OFFSET_DATA chunk with DONE.
    let mut req = Vec::new();
    proto::encode_request(
        &proto::Request {
            flags: 0,
            command: proto::CMD_READ,
            handle: 77,
            offset: 100,
            length: 50,
        },
        &mut req,
    );
    s.write_all(&req).expect("read");
    let mut hd = [0u8; 20];
    s.read_exact(&mut hd).expect("chunk header");
    assert_eq!(
        proto::decode_reply_header(&hd),
        Ok(proto::ReplyHeader::Structured {
            flags: proto::REPLY_FLAG_DONE,
            kind: proto::REPLY_TYPE_OFFSET_DATA,
            handle: 77,
            len: 58
        })
    );
    let mut body = [0u8; 58];
    s.read_exact(&mut body).expect("chunk body");
    assert_eq!(u64::from_be_bytes(body[..8].try_into().expect("8")), 100);
    assert_eq!(&body[8..], &data[100..150]);
}

#[test]
fn malformed_handshakes_close_only_their_connection() {
    let (_dir, data, h) = root("malformed", MIB);
    let garbage: [&[u8]; 4] = [
        b"\x00\x00\x00\x01GARBAGEGARBAGEGARBAGE",
        // Bad client flags.
        &[0xff, 0xff, 0xff, 0xff],
        // Option with a huge length.
        &[
            0, 0, 0, 1, b'I', b'H', b'A', b'V', b'E', b'O', b'P', b'T', 0, 0, 0, 7, 0xff, 0xff,
            0xff, 0xff,
        ],
        // Valid GO, then a request with bad magic.
        &[],
    ];
    for g in garbage {
        if g.is_empty() {
            let mut c = RawClient::connect(h.port, "golden");
            c.s.write_all(&[0u8; 28]).expect("bad request");
            let mut rest = Vec::new();
            let closed = c.s.read_to_end(&mut rest);
            assert!(
                closed.is_ok() && rest.is_empty(),
                "bad magic closes the connection: {closed:?}"
            );
            continue;
        }
        let mut s = TcpStream::connect(("127.0.0.1", h.port)).expect("connect");
        // Shorter than the server's 30 s handshake deadline: only a close
        // caused by the bad input ends the read in time.
        s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .expect("timeout");
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet).expect("greeting");
        let _ = s.write_all(g);
        let mut rest = Vec::new();
        // A close with our garbage still unread arrives as a reset.
        let closed = s.read_to_end(&mut rest);
        let closed_ok = match &closed {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        assert!(
            closed_ok && rest.is_empty(),
            "{g:?}: the server did not close without a reply: {closed:?}, {} bytes",
            rest.len()
        );
    }
    // The daemon is alive and serving.
    let mut c = RawClient::connect(h.port, "golden");
    c.send(proto::CMD_READ, 1, 0, 16, &[]);
    let (_, err, got) = c.reply(|_| 16);
    assert_eq!(err, 0);
    assert_eq!(got, data[..16]);
}

fn herd_fails(args: &[&str]) -> String {
    let out = Command::new(common::HERD)
        .args(args)
        .output()
        .expect("run herd");
    assert!(!out.status.success(), "herd {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_input_gives_clear_errors() {
    let dir = scratch("badinput");
    let cache = dir.join("c");
    let c = cache.to_str().expect("utf8");
    let e = herd_fails(&[
        "serve",
        "--upstream",
        "http://x/y",
        "--listen",
        "127.0.0.1:1",
        "--cache-dir",
        c,
    ]);
    assert!(e.contains("scheme `http` is not supported"), "{e}");
    let e = herd_fails(&[
        "serve",
        "--upstream",
        "/nonexistent/img",
        "--listen",
        "127.0.0.1:1",
        "--cache-dir",
        c,
    ]);
    assert!(
        e.contains("/nonexistent/img is unreadable") && e.contains("No such file"),
        "{e}"
    );
    let port = common::free_port();
    let e = herd_fails(&[
        "serve",
        "--upstream",
        &format!("nbd://127.0.0.1:{port}/x"),
        "--listen",
        "127.0.0.1:1",
        "--cache-dir",
        c,
        "--parent-timeout",
        "0",
    ]);
    assert!(
        e.contains("unreachable") && e.contains("Connection refused"),
        "{e}"
    );
    let cfg = dir.join("herd.toml");
    std::fs::write(&cfg, "upstream = \"/x\"\nlisten = \"127.0.0.1:1\"\n").expect("write");
    let e = herd_fails(&["serve", "--config", cfg.to_str().expect("utf8")]);
    assert!(e.contains("line 2") && e.contains("listen"), "{e}");
    let e = herd_fails(&["serve", "--upstream", "/x", "--listen", "127.0.0.1:1"]);
    assert!(e.contains("missing setting `cache_dir`"), "{e}");
}

#[test]
fn config_file_serves_like_flags() {
    let dir = scratch("config");
    let img = dir.join("golden.img");
    let data = random_image(&img, MIB);
    let port = common::free_port();
    let cfg = dir.join("herd.toml");
    std::fs::write(
        &cfg,
        format!(
            "upstream = \"file://{}\"\nlisten = [\"127.0.0.1:{port}\"]\ncache_dir = \"{}\"\nexport_name = \"cfg\"\nchunk_size = \"64KiB\"\n",
            img.display(),
            dir.join("cache").display()
        ),
    )
    .expect("write");
    let _p = common::Peer(
        Command::new(common::HERD)
            .args(["serve", "--config", cfg.to_str().expect("utf8")])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn"),
    );
    common::wait_port(port);
    let mut c = RawClient::connect(port, "cfg");
    c.send(proto::CMD_READ, 1, 70_000, 100, &[]);
    let (_, err, got) = c.reply(|_| 100);
    assert_eq!(err, 0);
    assert_eq!(got, data[70_000..70_100]);
    let bmp = std::fs::read(dir.join("cache/herd-cache.bitmap")).expect("bitmap");
    let herd::cache::bitmap::Decoded::Current(hdr) = herd::cache::bitmap::decode_header(&bmp)
    else {
        panic!("not a current bitmap");
    };
    assert_eq!(
        hdr.chunk_size,
        64 << 10,
        "chunk_size from the file took effect"
    );
}
