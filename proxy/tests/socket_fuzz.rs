//! Socket-level fuzzing of running daemons, bounded in count and time.
//!
//! * Export side: thousands of connections to a herd (TLS on) carrying
//!   random bytes, mutated handshakes, mutated requests, STARTTLS followed
//!   by garbage, and clients that never read their replies.
//! * Client side: a herd whose parent is a hostile NBD server that mangles
//!   handshakes and replies (wrong magic, handles, lengths, flipped data,
//!   early closes, duplicate replies).
//!
//! Both check that herd stays up, a good client then reads correct bytes,
//! no read ever returns wrong bytes, and the daemon's peak RSS stays
//! within its bound. `HERD_SOCKET_FUZZ_SESSIONS` / `HERD_SOCKET_FUZZ_READS`
//! lengthen the runs and `HERD_SOCKET_FUZZ_OUT` names a directory for
//! their figures (`cargo xtask fuzz --socket`); a failure prints the seed,
//! and `HERD_SOCKET_FUZZ_SEED` replays it.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{build_manifest, random_image, scratch, Herd, RawClient, HERD};
use herd::nbd::proto;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const MIB: u64 = 1 << 20;
/// Peak RSS a daemon may reach: the 64 MiB target (the bitmaps of these
/// small images are bytes).
const RSS_BOUND_KIB: u64 = 64 * 1024;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn seed() -> u64 {
    let s = env_u64("HERD_SOCKET_FUZZ_SEED", rand::random());
    eprintln!("socket fuzz seed {s} (HERD_SOCKET_FUZZ_SEED={s} replays it)");
    s
}

/// The daemon's peak RSS (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// Writes a run's figures to `$HERD_SOCKET_FUZZ_OUT/NAME.json`, if set.
fn report(name: &str, figures: &serde_json::Value) {
    if let Ok(dir) = std::env::var("HERD_SOCKET_FUZZ_OUT") {
        let path = Path::new(&dir).join(format!("{name}.json"));
        std::fs::write(&path, figures.to_string()).expect("write fuzz figures");
    }
}

/// Alive, within its memory bound, and serving correct bytes to a good
/// client.
fn check_healthy(herd: &mut Herd, img: &[u8], rng: &mut StdRng, what: &str) {
    assert!(
        herd.child.try_wait().expect("wait").is_none(),
        "herd exited during the {what} fuzz:\n{}",
        std::fs::read_to_string(&herd.log).unwrap_or_default()
    );
    let peak = peak_rss_kib(herd.child.id());
    assert!(
        peak <= RSS_BOUND_KIB,
        "peak RSS {peak} KiB past {RSS_BOUND_KIB} KiB in the {what} fuzz"
    );
    let mut c = RawClient::connect(herd.port, "herd");
    for _ in 0..4 {
        let len = rng.gen_range(1..=256 * 1024u64);
        let off = rng.gen_range(0..img.len() as u64 - len);
        let got = c.read(off, u32::try_from(len).expect("len"));
        let at = usize::try_from(off).expect("offset");
        assert!(
            got == img[at..at + got.len()],
            "wrong bytes at {off}+{len} after the {what} fuzz"
        );
    }
}

/// A few random mutations: bit flips, byte sets, interesting 32-bit
/// values, insertions, deletions, duplications, truncation.
fn mutate(rng: &mut StdRng, mut b: Vec<u8>) -> Vec<u8> {
    const INTERESTING: [u32; 7] = [
        0,
        1,
        0x7fff_ffff,
        0x8000_0000,
        0xffff_ffff,
        proto::MAX_REQUEST + 1,
        proto::MAX_OPTION_LEN + 1,
    ];
    for _ in 0..rng.gen_range(1..=6) {
        let len = b.len();
        match rng.gen_range(0..7) {
            0 if len > 0 => {
                let i = rng.gen_range(0..len);
                b[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.gen_range(0..len);
                b[i] = rng.gen();
            }
            2 if len >= 4 => {
                let i = rng.gen_range(0..=len - 4);
                let v = INTERESTING[rng.gen_range(0..INTERESTING.len())];
                b[i..i + 4].copy_from_slice(&v.to_be_bytes());
            }
            3 => {
                let i = rng.gen_range(0..=len);
                let mut extra = vec![0u8; rng.gen_range(1..64)];
                rng.fill_bytes(&mut extra);
                b.splice(i..i, extra);
            }
            4 if len > 0 => {
                let i = rng.gen_range(0..len);
                let j = rng.gen_range(i..=len.min(i + 32));
                b.drain(i..j);
            }
            5 if len > 0 => {
                let i = rng.gen_range(0..len);
                let j = rng.gen_range(i..=len.min(i + 64));
                let dup = b[i..j].to_vec();
                b.splice(j..j, dup);
            }
            6 if len > 0 => b.truncate(rng.gen_range(0..len)),
            _ => {}
        }
    }
    b
}

fn option(opt: u32, payload: &[u8], out: &mut Vec<u8>) {
    proto::encode_option(opt, payload, out);
}

/// Client flags and a plausible option sequence ending in GO.
fn handshake(rng: &mut StdRng, export: &str) -> Vec<u8> {
    let mut out = (proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    let info = proto::encode_info_request(&proto::InfoRequest {
        name: export.into(),
        infos: vec![proto::INFO_BLOCK_SIZE, proto::INFO_NAME],
    });
    let meta = proto::encode_meta_context_request(&proto::MetaContextRequest {
        export: export.into(),
        queries: vec![proto::CONTEXT_BASE_ALLOCATION.into(), "qemu:dirty".into()],
    });
    for _ in 0..rng.gen_range(0..4) {
        match rng.gen_range(0..6) {
            0 => option(proto::OPT_LIST, &[], &mut out),
            1 => option(proto::OPT_INFO, &info, &mut out),
            2 => option(proto::OPT_STRUCTURED_REPLY, &[], &mut out),
            3 => option(proto::OPT_LIST_META_CONTEXT, &meta, &mut out),
            4 => option(proto::OPT_SET_META_CONTEXT, &meta, &mut out),
            _ => option(rng.gen_range(11..64), &[1, 2, 3], &mut out),
        }
    }
    option(proto::OPT_GO, &info, &mut out);
    out
}

/// Transmission requests of every command, sensible and not.
fn requests(rng: &mut StdRng, size: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.gen_range(1..12) {
        let command = match rng.gen_range(0..10) {
            0..=3 => proto::CMD_READ,
            4 => proto::CMD_WRITE,
            5 => proto::CMD_CACHE,
            6 => proto::CMD_BLOCK_STATUS,
            7 => proto::CMD_FLUSH,
            8 => proto::CMD_TRIM,
            _ => rng.gen_range(8..64),
        };
        let length = match rng.gen_range(0..4) {
            0 => rng.gen_range(0..4096),
            1 => rng.gen_range(0..proto::MAX_REQUEST),
            2 => rng.gen(),
            _ => 65536,
        };
        let offset = match rng.gen_range(0..3) {
            0 => rng.gen_range(0..size),
            1 => size - u64::from(length).min(size),
            _ => rng.gen(),
        };
        proto::encode_request(
            &proto::Request {
                flags: if rng.gen_bool(0.2) { rng.gen() } else { 0 },
                command,
                handle: rng.gen(),
                offset,
                length,
            },
            &mut out,
        );
        if command == proto::CMD_WRITE {
            let mut payload = vec![0u8; usize::try_from(length.min(8192)).unwrap_or(0)];
            rng.fill_bytes(&mut payload);
            out.extend_from_slice(&payload);
        }
    }
    out
}

/// Reads what the server sends for a moment, then returns (dropping the
/// socket closes it).
fn drain(s: &mut TcpStream) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(10)));
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_millis(40);
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[test]
fn herd_survives_hostile_clients() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let dir = scratch("socket-fuzz-export");
    let img_path = dir.join("disk.img");
    let img = random_image(&img_path, 16 * MIB as usize);
    let certs = dir.join("pki");
    let ok = std::process::Command::new(HERD)
        .args(["tls", "certs"])
        .arg(&certs)
        .args(["--server", "localhost", "--client", "client"])
        .output()
        .expect("herd tls certs");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let pem = |f: &str| certs.join(f).to_str().expect("utf8").to_owned();
    let mut herd = Herd::start(
        &dir,
        "node",
        img_path.to_str().expect("utf8"),
        &[
            "--chunk-size",
            "64KiB",
            "--tls",
            "on",
            "--tls-cert",
            &pem("server-cert.pem"),
            "--tls-key",
            &pem("server-key.pem"),
            "--write-timeout",
            "2",
        ],
    );
    let sessions = env_u64("HERD_SOCKET_FUZZ_SESSIONS", 1500);
    let deadline = Instant::now() + Duration::from_secs(env_u64("HERD_SOCKET_FUZZ_SECONDS", 90));
    let size = img.len() as u64;
    let mut stuck: std::collections::VecDeque<TcpStream> = std::collections::VecDeque::new();
    let mut done = 0;
    while done < sessions && Instant::now() < deadline {
        done += 1;
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", herd.port)) else {
            continue;
        };
        let kind = rng.gen_range(0..6);
        if kind != 0 {
            // Past the greeting; a refused or closing server is fine.
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut g = [0u8; proto::GREETING_LEN];
            if s.read_exact(&mut g).is_err() {
                continue;
            }
        }
        let bytes = match kind {
            0 => {
                let mut b = vec![0u8; rng.gen_range(0..4096)];
                rng.fill_bytes(&mut b);
                b
            }
            1 => {
                let b = handshake(&mut rng, "herd");
                mutate(&mut rng, b)
            }
            2 => {
                let mut b = handshake(&mut rng, "herd");
                let r = requests(&mut rng, size);
                b.extend(mutate(&mut rng, r));
                b
            }
            3 => {
                // STARTTLS, then a ClientHello cut short or garbled.
                let mut b = 3u32.to_be_bytes().to_vec();
                option(proto::OPT_STARTTLS, &[], &mut b);
                let mut hello = vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];
                hello.resize(rng.gen_range(9..600), 0);
                rng.fill_bytes(&mut hello[9..]);
                b.extend(mutate(&mut rng, hello));
                b
            }
            4 => {
                // Valid requests whose replies are never read.
                let mut b = handshake(&mut rng, "herd");
                for _ in 0..rng.gen_range(1..64) {
                    proto::encode_request(
                        &proto::Request {
                            flags: 0,
                            command: proto::CMD_READ,
                            handle: rng.gen(),
                            offset: rng.gen_range(0..size - MIB),
                            length: u32::try_from(MIB).expect("len"),
                        },
                        &mut b,
                    );
                }
                b
            }
            _ => {
                let name = "x".repeat(rng.gen_range(0..5000));
                let mut b = handshake(&mut rng, &name);
                b.extend(requests(&mut rng, size));
                mutate(&mut rng, b)
            }
        };
        let _ = s.write_all(&bytes);
        if kind == 4 {
            stuck.push_back(s);
            if stuck.len() > 8 {
                stuck.pop_front();
            }
        } else {
            drain(&mut s);
        }
        if done % 250 == 0 {
            check_healthy(&mut herd, &img, &mut rng, "export");
        }
    }
    drop(stuck);
    check_healthy(&mut herd, &img, &mut rng, "export");
    let peak = peak_rss_kib(herd.child.id());
    eprintln!("{done} hostile sessions, peak RSS {peak} KiB");
    assert!(done >= 300, "only {done} sessions ran");
    // The sessions reached herd (not all refused at accept).
    let accepted = herd.metric("herd_nbd_connections_total");
    assert!(accepted >= done as f64 * 0.9);
    report(
        "clients",
        &serde_json::json!({
            "seed": seed,
            "sessions": done,
            "connections_accepted": accepted,
            "seconds": started.elapsed().as_secs_f64(),
            "peak_rss_kib": peak,
            "rss_bound_kib": RSS_BOUND_KIB,
        }),
    );
    drop(herd);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A parent that speaks NBD, honestly or not.
struct FakeParent {
    port: u16,
    hostile: Arc<AtomicBool>,
    /// Mangled greetings, option replies and replies sent.
    mangled: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl FakeParent {
    fn start(img: Arc<Vec<u8>>, seed: u64) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        l.set_nonblocking(true).expect("nonblocking");
        let hostile = Arc::new(AtomicBool::new(false));
        let mangled = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, m, st) = (
            Arc::clone(&hostile),
            Arc::clone(&mangled),
            Arc::clone(&stop),
        );
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !st.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        n += 1;
                        let (img, h, m, st) = (
                            Arc::clone(&img),
                            Arc::clone(&h),
                            Arc::clone(&m),
                            Arc::clone(&st),
                        );
                        let rng = StdRng::seed_from_u64(seed ^ n);
                        std::thread::spawn(move || {
                            let _ = serve(s, &img, &h, &m, &st, rng);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            port,
            hostile,
            mangled,
            stop,
        }
    }
}

impl Drop for FakeParent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One connection of the fake parent.
fn serve(
    mut s: TcpStream,
    img: &[u8],
    hostile: &AtomicBool,
    mangled: &AtomicU64,
    stop: &AtomicBool,
    mut rng: StdRng,
) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let evil = |rng: &mut StdRng, p: f64| hostile.load(Ordering::Relaxed) && rng.gen_bool(p);
    let mut greeting = Vec::new();
    proto::encode_greeting(
        proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES,
        &mut greeting,
    );
    if evil(&mut rng, 0.2) {
        mangled.fetch_add(1, Ordering::Relaxed);
        return s.write_all(&mutate(&mut rng, greeting));
    }
    s.write_all(&greeting)?;
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags)?;
    // Options until GO.
    loop {
        let mut h = [0u8; proto::OPTION_HEADER_LEN];
        s.read_exact(&mut h)?;
        let Ok(o) = proto::decode_option_header(&h) else {
            return Ok(());
        };
        let mut payload = vec![0u8; o.len as usize];
        s.read_exact(&mut payload)?;
        let mut out = Vec::new();
        match o.option {
            proto::OPT_GO | proto::OPT_INFO => {
                let tflags = proto::TFLAG_HAS_FLAGS
                    | proto::TFLAG_READ_ONLY
                    | proto::TFLAG_CAN_MULTI_CONN
                    | proto::TFLAG_SEND_CACHE;
                let export = proto::encode_info_export(img.len() as u64, tflags);
                proto::encode_option_reply(o.option, proto::REP_INFO, &export, &mut out);
                let bs = proto::encode_info_block_size(1, 4096, proto::MAX_REQUEST);
                proto::encode_option_reply(o.option, proto::REP_INFO, &bs, &mut out);
                proto::encode_option_reply(o.option, proto::REP_ACK, &[], &mut out);
            }
            proto::OPT_ABORT => return Ok(()),
            _ => proto::encode_option_reply(o.option, proto::REP_ERR_UNSUP, &[], &mut out),
        }
        if evil(&mut rng, 0.2) {
            mangled.fetch_add(1, Ordering::Relaxed);
            if rng.gen_bool(0.3) {
                // A reply header announcing a huge payload, then silence.
                let mut huge = Vec::new();
                proto::encode_option_reply(o.option, proto::REP_INFO, &[], &mut huge);
                huge[16..20].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
                return s.write_all(&huge);
            }
            return s.write_all(&mutate(&mut rng, out));
        }
        s.write_all(&out)?;
        if o.option == proto::OPT_GO {
            break;
        }
    }
    // Transmission.
    while !stop.load(Ordering::Relaxed) {
        let mut h = [0u8; proto::REQUEST_LEN];
        match s.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(e) => return Err(e),
        }
        let Ok(r) = proto::decode_request(&h) else {
            return Ok(());
        };
        let mut out = Vec::new();
        let range = usize::try_from(r.offset).ok().and_then(|o| {
            let end = o.checked_add(r.length as usize)?;
            img.get(o..end)
        });
        match (r.command, range) {
            (proto::CMD_DISC, _) => return Ok(()),
            (proto::CMD_READ, Some(data)) => {
                proto::encode_simple_reply(0, r.handle, &mut out);
                out.extend_from_slice(data);
            }
            _ => proto::encode_simple_reply(proto::EINVAL, r.handle, &mut out),
        }
        if !evil(&mut rng, 0.3) {
            s.write_all(&out)?;
            continue;
        }
        mangled.fetch_add(1, Ordering::Relaxed);
        match rng.gen_range(0..8) {
            // Wrong magic, handle or error; flipped data; cut short.
            0 => out[0] ^= 0x40,
            1 => out[8..16].copy_from_slice(&rng.gen::<u64>().to_be_bytes()),
            2 => out[4..8].copy_from_slice(&proto::EIO.to_be_bytes()),
            3 if out.len() > proto::SIMPLE_REPLY_LEN => {
                let i = rng.gen_range(proto::SIMPLE_REPLY_LEN..out.len());
                out[i] ^= 1;
            }
            4 => {
                let cut = rng.gen_range(0..out.len());
                s.write_all(&out[..cut])?;
                return Ok(());
            }
            5 => {
                // Sent twice.
                s.write_all(&out)?;
            }
            6 => {
                // A structured reply never negotiated.
                out.clear();
                proto::encode_structured_error(r.handle, proto::EIO, "no", &mut out);
            }
            _ => {
                std::thread::sleep(Duration::from_millis(rng.gen_range(0..300)));
            }
        }
        s.write_all(&out)?;
    }
    Ok(())
}

#[test]
fn herd_survives_a_hostile_parent_and_never_serves_its_bad_bytes() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let dir = scratch("socket-fuzz-parent");
    let img_path = dir.join("disk.img");
    let img = Arc::new(random_image(&img_path, 16 * MIB as usize));
    let manifest = build_manifest(&img_path);
    let parent = FakeParent::start(Arc::clone(&img), seed);
    // A small cap keeps chunks leaving, so reads keep reaching the parent.
    let mut herd = Herd::start(
        &dir,
        "leaf",
        &format!("nbd://127.0.0.1:{}/x", parent.port),
        &[
            "--chunk-size",
            "64KiB",
            "--manifest",
            manifest.to_str().expect("utf8"),
            "--fetch-buffer",
            "1MiB",
            "--cache-size",
            "2MiB",
            "--read-ahead",
            "0",
            "--request-timeout",
            "5",
        ],
    );
    parent.hostile.store(true, Ordering::Relaxed);
    let reads = env_u64("HERD_SOCKET_FUZZ_READS", 300);
    let deadline = Instant::now() + Duration::from_secs(env_u64("HERD_SOCKET_FUZZ_SECONDS", 90));
    let (mut good, mut failed, mut done) = (0u64, 0u64, 0u64);
    let mut client = RawClient::connect(herd.port, "herd");
    while done < reads && Instant::now() < deadline {
        done += 1;
        let len = rng.gen_range(1..=192 * 1024u64);
        let off = rng.gen_range(0..img.len() as u64 - len);
        match client.try_read(off, u32::try_from(len).expect("len")) {
            Ok(got) => {
                let at = usize::try_from(off).expect("offset");
                assert!(
                    got == img[at..at + got.len()],
                    "herd served wrong bytes at {off}+{len}"
                );
                good += 1;
            }
            Err(_) => failed += 1,
        }
        if done % 100 == 0 {
            assert!(
                herd.child.try_wait().expect("wait").is_none(),
                "herd exited:\n{}",
                std::fs::read_to_string(&herd.log).unwrap_or_default()
            );
        }
    }
    let mangled = parent.mangled.load(Ordering::Relaxed);
    eprintln!("{done} reads through a hostile parent: {good} good, {failed} failed, {mangled} mangled messages");
    assert!(done >= 50, "only {done} reads ran");
    assert!(mangled >= 10, "the parent mangled only {mangled} messages");
    assert!(good > 0, "no read got through");
    // The parent turns honest: herd recovers and serves everything.
    parent.hostile.store(false, Ordering::Relaxed);
    let mut c = RawClient::connect(herd.port, "herd");
    for i in 0..16 {
        let got = c.read(i * MIB, u32::try_from(MIB).expect("len"));
        let at = usize::try_from(i * MIB).expect("offset");
        assert!(got == img[at..at + got.len()], "MiB {i} differs");
    }
    check_healthy(&mut herd, &img, &mut rng, "parent");
    report(
        "parent",
        &serde_json::json!({
            "seed": seed,
            "reads": done,
            "good": good,
            "failed": failed,
            "mangled_messages": mangled,
            "digest_failures": herd.metric("herd_chunk_digest_failures_total{source=\"parent\"}"),
            "seconds": started.elapsed().as_secs_f64(),
            "peak_rss_kib": peak_rss_kib(herd.child.id()),
            "rss_bound_kib": RSS_BOUND_KIB,
        }),
    );
    drop(herd);
    drop(parent);
    let _ = std::fs::remove_dir_all(&dir);
}
