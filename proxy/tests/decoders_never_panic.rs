//! Every parser of untrusted bytes, fed a fixed-seed stream of random and
//! mutated inputs: none may panic. (The same parsers have cargo-fuzz
//! targets in fuzz/ for open-ended runs; this keeps CI honest without one.)

use herd::cache::bitmap;
use herd::iscsi::{pdu, scsi, text};
use herd::manifest::{Identity, Manifest};
use herd::nbd::proto;
use herd::profile::{self, Extent, ImageId, Profile};
use rand::{Rng, RngCore, SeedableRng};

fn all_decoders(d: &[u8]) {
    let _ = proto::decode_greeting(d);
    let _ = proto::decode_option_header(d);
    let _ = proto::decode_info_request(d);
    let _ = proto::decode_option_reply_header(d);
    let _ = proto::decode_info(d);
    let _ = proto::decode_request(d);
    let _ = proto::decode_reply_header(d);
    if let Ok(r) = proto::decode_meta_context_request(d) {
        assert_eq!(proto::encode_meta_context_request(&r), d);
    }
    let _ = proto::decode_meta_context_reply(d);
    let _ = proto::decode_list_entry(d);
    let _ = proto::decode_block_status(d);
    let _ = bitmap::decode_header(d);
    let _ = pdu::decode(d);
    let _ = pdu::rejected_itt(d);
    if let Ok(p) = text::parse(d) {
        for (_, v) in &p {
            let _ = text::decode_binary(v);
        }
    }
    let _ = scsi::parse_sense(d);
    let _ = scsi::parse_capacity16(d);
    let _ = scsi::parse_capacity10(d);
    let _ = scsi::parse_inquiry(d);
    let _ = scsi::parse_serial(d);
    let _ = scsi::parse_designator(d);
    let _ = scsi::parse_block_limits(d);
    let _ = scsi::parse_report_luns(d);
    let _ = scsi::parse_lba_status(d);
    let _ = Profile::decode(d);
    // Fleet files are text an operator writes, and etcd values JSON a
    // member wrote: neither may panic a node.
    if let Ok(text) = std::str::from_utf8(d) {
        let _ = herd::fleet::file::parse(std::path::Path::new("f"), text);
    }
    let _ = serde_json::from_slice::<herd::fleet::Member>(d);
    if let Ok(m) = Manifest::decode(d) {
        assert_eq!(m.bytes(), d);
        let _ = m.bad_chunks(0, d);
        let _ = m.block_status(0, m.image_size(), 64);
    }
    // Past the checksum too: the extent checks must hold on their own.
    let mut sealed = d.to_vec();
    profile::reseal(&mut sealed);
    if let Ok(p) = Profile::decode(&sealed) {
        assert_eq!(Profile::decode(&p.encode()).ok(), Some(p));
    }
}

#[test]
fn random_and_mutated_inputs_never_panic() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x4845_5244);
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    let mut v = Vec::new();
    proto::encode_request(
        &proto::Request {
            flags: 0,
            command: proto::CMD_READ,
            handle: 1,
            offset: 0,
            length: 4096,
        },
        &mut v,
    );
    seeds.push(v);
    seeds.push(proto::encode_info_request(&proto::InfoRequest {
        name: "golden".into(),
        infos: vec![3],
    }));
    seeds.push(
        bitmap::encode_header(&bitmap::Header {
            image_size: 1 << 30,
            chunk_size: 65536,
            chunks: 16384,
            identity: Identity([3; 32]),
        })
        .to_vec(),
    );
    seeds.push(proto::encode_meta_context_request(
        &proto::MetaContextRequest {
            export: "herd".into(),
            queries: vec!["base:allocation".into()],
        },
    ));
    seeds.push(vec![0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 3]);
    seeds.push(
        Manifest::from_digests(3 << 12, 4096, &[[1; 32], [2; 32], [3; 32]])
            .map(|m| m.bytes().to_vec())
            .unwrap_or_default(),
    );
    let mut login = Vec::new();
    pdu::encode_login(
        &pdu::LoginReq {
            transit: true,
            csg: 1,
            nsg: 3,
            isid: [0x80, 1, 2, 3, 4, 5],
            tsih: 0,
            itt: 0,
            cid: 0,
            cmd_sn: 1,
            exp_stat_sn: 0,
        },
        b"HeaderDigest=None\0",
        &mut login,
    );
    login[0] = pdu::OP_LOGIN_RESP;
    seeds.push(login);
    seeds.push(b"TargetName=iqn.x\0CHAP_C=0x0102ff\0".to_vec());
    seeds.push(
        b"fanout = 2\n[root]\nname = \"r\"\naddr = \"10.0.0.1:10809\"\n[[node]]\nname = \"a\"\naddr = \"10.0.0.2:1\"\nparent = \"b\"\n[[node]]\nname = \"b\"\naddr = \"h:2\"\n"
            .to_vec(),
    );
    seeds.push(br#"{"name":"a","addr":"10.0.0.2:10809","slot":3}"#.to_vec());
    seeds.push(
        Profile {
            granule: 4096,
            image_size: 1 << 20,
            identity: ImageId([9; 32]),
            recorded_at: 1,
            extents: vec![
                Extent {
                    offset: 0,
                    len: 4096,
                    at_us: 0,
                },
                Extent {
                    offset: 8192,
                    len: 8192,
                    at_us: 7,
                },
            ],
        }
        .encode(),
    );
    for _ in 0..100_000 {
        let mut d = if rng.gen_bool(0.5) {
            let mut d = vec![0u8; rng.gen_range(0..200)];
            rng.fill_bytes(&mut d);
            d
        } else {
            let mut d = seeds[rng.gen_range(0..seeds.len())].clone();
            for _ in 0..rng.gen_range(1..6) {
                if d.is_empty() {
                    break;
                }
                let i = rng.gen_range(0..d.len());
                d[i] = rng.gen();
            }
            let cut = rng.gen_range(0..=d.len());
            d.truncate(cut);
            d
        };
        all_decoders(&d);
        d.clear();
    }
}
