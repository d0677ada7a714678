//! Everything an iSCSI target can send: BHS headers, login/text key data,
//! sense data and SCSI parameter pages, and the same bytes as a stream cut
//! into pieces of a size the input picks. Decoders must never panic, and
//! the session's direct reads (headers exactly, Data-In payloads placed by
//! the caller) must yield what the plain stream yields.
#![no_main]

use herd::iscsi::pdu::TargetPdu;
use herd::iscsi::stream::{Event, PduStream, StreamError};
use herd::iscsi::{pdu, scsi, text};
use libfuzzer_sys::fuzz_target;

/// Data-In bytes placed, contiguous runs merged: (itt, offset, bytes).
type Placed = Vec<(u32, usize, Vec<u8>)>;

fn place(placed: &mut Placed, itt: u32, offset: usize, bytes: &[u8]) {
    match placed.last_mut() {
        Some((i, o, d)) if *i == itt && *o + d.len() == offset => d.extend_from_slice(bytes),
        _ => placed.push((itt, offset, bytes.to_vec())),
    }
}

/// Feeds `input` to `p` until it is used up; false on an error.
fn feed(
    p: &mut PduStream,
    mut input: &[u8],
    placed: &mut Placed,
    pdus: &mut Vec<TargetPdu>,
    err: &mut Option<StreamError>,
) -> bool {
    loop {
        match p.next(&mut input) {
            Ok(Some(Event::Data { itt, offset, bytes })) => place(placed, itt, offset, bytes),
            Ok(Some(Event::Pdu { pdu, .. })) => pdus.push(pdu),
            Ok(None) => {
                // Whatever it did not yield it keeps: input is used up.
                assert!(input.is_empty());
                return true;
            }
            Err(e) => {
                *err = Some(e);
                return false;
            }
        }
    }
}

type Outcome = (Placed, Vec<TargetPdu>, Option<StreamError>);

/// The plain stream, in pieces of `step`.
fn by_stream(wire: &[u8], step: usize, digests: bool) -> Outcome {
    let mut p = PduStream::new(digests, digests);
    let (mut placed, mut pdus, mut err) = (Vec::new(), Vec::new(), None);
    for piece in wire.chunks(step) {
        if !feed(&mut p, piece, &mut placed, &mut pdus, &mut err) {
            break;
        }
    }
    (placed, pdus, err)
}

/// As the session reads once payloads are large: up to the next payload
/// exactly, payloads (at most `step` a read) placed by the caller.
fn by_direct(wire: &[u8], step: usize, digests: bool) -> Outcome {
    let mut p = PduStream::new(digests, digests);
    let (mut placed, mut pdus, mut err) = (Vec::new(), Vec::new(), None);
    let mut at = 0;
    while at < wire.len() {
        let rest = wire.len() - at;
        if let Some((itt, offset, left)) = p.payload_wanted() {
            let n = left.min(step).min(rest);
            place(&mut placed, itt, offset, &wire[at..at + n]);
            p.data_received(&wire[at..at + n]);
            at += n;
        } else {
            let want = p.until_payload().filter(|n| *n > 0).unwrap_or(step);
            let n = want.min(step).min(rest);
            let ok = feed(&mut p, &wire[at..at + n], &mut placed, &mut pdus, &mut err);
            at += n;
            if !ok {
                break;
            }
        }
        // A payload placed in full leaves its PDU to be emitted.
        if !feed(&mut p, &[], &mut placed, &mut pdus, &mut err) {
            break;
        }
    }
    (placed, pdus, err)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let _ = pdu::decode(data);
    let _ = pdu::rejected_itt(data);
    if let Ok(pairs) = text::parse(data) {
        for (_, v) in &pairs {
            let _ = text::decode_binary(v);
        }
    }
    let _ = scsi::parse_sense(data);
    let _ = scsi::parse_capacity16(data);
    let _ = scsi::parse_capacity10(data);
    let _ = scsi::parse_inquiry(data);
    let _ = scsi::parse_serial(data);
    let _ = scsi::parse_designator(data);
    let _ = scsi::parse_block_limits(data);
    let _ = scsi::parse_report_luns(data);
    let _ = scsi::parse_lba_status(data);
    let step = usize::from(data[0]) + 1;
    for digests in [false, true] {
        let plain = by_stream(&data[1..], step, digests);
        let direct = by_direct(&data[1..], step, digests);
        assert!(plain == direct, "direct reads differ from the stream");
    }
});
