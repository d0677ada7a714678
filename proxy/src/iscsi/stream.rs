//! Target PDUs parsed as the bytes stream in, in pieces of any size.
//!
//! A Data-In's payload is handed out piece by piece, as it arrives, so the
//! session copies it once, from the receive buffer into the command's
//! buffer, however the PDU is split across receives; other PDUs' (small)
//! payloads are gathered and handed out whole. Digests (CRC32C) are checked
//! over the pieces as they pass. Pure over bytes: no socket here.

use super::pdu::{self, TargetPdu};

/// Largest data segment accepted: targets send at most the
/// MaxRecvDataSegmentLength we declared; this leaves room for a target
/// that rounds it up, and refuses one that ignores it.
pub const MAX_DATA: usize = 4 * super::login::OUR_MAX_RECV_DSL as usize;

/// What the stream produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// Payload bytes of Data-In `itt` for buffer offset `offset`.
    Data {
        itt: u32,
        offset: usize,
        bytes: &'a [u8],
    },
    /// A whole PDU, once its digests passed; a Data-In's payload came
    /// before it as `Data` events, so `payload` is empty for Data-In.
    Pdu { pdu: TargetPdu, payload: Vec<u8> },
}

/// Why the stream cannot go on: the connection must be dropped.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("malformed PDU: {0}")]
    Malformed(String),
    #[error("data segment of {0} bytes is too large")]
    TooLarge(usize),
    #[error("digest mismatch (header ok: {header}, data ok: {data})")]
    Digest { header: bool, data: bool },
}

enum State {
    /// Gathering BHS, AHS and header digest in `hdr`.
    Header,
    /// Passing the data segment and its padding.
    Payload {
        pdu: TargetPdu,
        /// Data-In: (itt, buffer offset) the pieces go to.
        data_in: Option<(u32, usize)>,
        len: usize,
        padded: usize,
        done: usize,
        crc: u32,
        gathered: Vec<u8>,
    },
    /// Gathering the 4-byte data digest.
    Digest {
        pdu: TargetPdu,
        crc: u32,
        got: [u8; 4],
        have: usize,
        gathered: Vec<u8>,
    },
}

/// The parser: feed it input with [`PduStream::next`] until it returns
/// `None` (input used up, or more needed).
pub struct PduStream {
    header_digest: bool,
    data_digest: bool,
    hdr: Vec<u8>,
    state: State,
}

impl PduStream {
    #[must_use]
    pub fn new(header_digest: bool, data_digest: bool) -> Self {
        Self {
            header_digest,
            data_digest,
            hdr: Vec::with_capacity(pdu::BHS_LEN + 4),
            state: State::Header,
        }
    }

    /// Consumes from `input` up to the next event.
    ///
    /// # Errors
    /// A malformed header, an oversized segment or a digest mismatch; the
    /// stream is unusable afterwards.
    pub fn next<'a>(&mut self, input: &mut &'a [u8]) -> Result<Option<Event<'a>>, StreamError> {
        loop {
            match &mut self.state {
                State::Header => {
                    let want = self.header_len();
                    let n = (want - self.hdr.len()).min(input.len());
                    self.hdr.extend_from_slice(&input[..n]);
                    *input = &input[n..];
                    if self.hdr.len() < want {
                        return Ok(None);
                    }
                    // The AHS length is known once the BHS is in.
                    if want == pdu::BHS_LEN && self.header_len() > want {
                        continue;
                    }
                    if let Some(e) = self.start_payload()? {
                        return Ok(Some(e));
                    }
                }
                State::Payload { done, padded, .. } if *done == *padded => {
                    // Payload and padding are in and no digest follows.
                    if let Some(e) = self.emit_if_done() {
                        return Ok(Some(e));
                    }
                }
                State::Payload {
                    data_in,
                    len,
                    padded,
                    done,
                    crc,
                    gathered,
                    ..
                } => {
                    if input.is_empty() {
                        return Ok(None);
                    }
                    let n = (*padded - *done).min(input.len());
                    let (piece, rest) = input.split_at(n);
                    *input = rest;
                    if self.data_digest {
                        *crc = crc32c::crc32c_append(*crc, piece);
                    }
                    // The part of this piece that is data, not padding.
                    let data = &piece[..(*len).saturating_sub(*done).min(n)];
                    let at = *done;
                    *done += n;
                    let finished = *done == *padded;
                    let event = match *data_in {
                        Some((itt, offset)) if !data.is_empty() => Some(Event::Data {
                            itt,
                            offset: offset + at,
                            bytes: data,
                        }),
                        Some(_) => None,
                        None => {
                            gathered.extend_from_slice(data);
                            None
                        }
                    };
                    if finished {
                        self.end_payload();
                    }
                    if event.is_some() {
                        return Ok(event);
                    }
                }
                State::Digest { got, have, .. } => {
                    if input.is_empty() {
                        return Ok(None);
                    }
                    let n = (4 - *have).min(input.len());
                    got[*have..*have + n].copy_from_slice(&input[..n]);
                    *have += n;
                    *input = &input[n..];
                    if *have < 4 {
                        return Ok(None);
                    }
                    let State::Digest {
                        pdu,
                        crc,
                        got,
                        gathered,
                        ..
                    } = std::mem::replace(&mut self.state, State::Header)
                    else {
                        continue;
                    };
                    if got != crc.to_le_bytes() {
                        return Err(StreamError::Digest {
                            header: true,
                            data: false,
                        });
                    }
                    return Ok(Some(Event::Pdu {
                        pdu,
                        payload: gathered,
                    }));
                }
            }
        }
    }

    /// Bytes to read before a Data-In payload could next go straight into
    /// place: the rest of the current header, or of the current PDU's
    /// payload, padding and digest; `None` inside a Data-In's data, which
    /// [`PduStream::payload_wanted`] describes. A reader expecting large
    /// payloads reads no further, so the next one is not copied.
    #[must_use]
    pub fn until_payload(&self) -> Option<usize> {
        let digest = if self.data_digest { 4 } else { 0 };
        match &self.state {
            State::Header => Some(self.header_len() - self.hdr.len()),
            State::Payload {
                data_in: Some(_),
                len,
                done,
                ..
            } if done < len => None,
            State::Payload { padded, done, .. } => Some(padded - done + digest),
            State::Digest { have, .. } => Some(4 - have),
        }
    }

    /// In a Data-In's data: the bytes after it up to the end of the next
    /// PDU's basic header (padding, data digest, BHS and header digest; an
    /// AHS is not foreseen). A reader placing the data may read these in
    /// the same call, into a buffer of its own that it then passes to
    /// [`PduStream::next`]: one receive instead of two per PDU, and never a
    /// byte of the next payload, which can then go straight into place too.
    #[must_use]
    pub fn after_payload(&self) -> usize {
        match &self.state {
            State::Payload {
                data_in: Some(_),
                len,
                padded,
                done,
                ..
            } if done < len => {
                let digest = if self.data_digest { 4 } else { 0 };
                let header_digest = if self.header_digest { 4 } else { 0 };
                padded - len + digest + pdu::BHS_LEN + header_digest
            }
            _ => 0,
        }
    }

    /// In a Data-In's payload: its command (Initiator Task Tag), the buffer
    /// offset of the next data byte, and the data bytes still to come
    /// (padding and digest not counted). The caller may read them from the
    /// socket into that buffer itself and report them with
    /// [`PduStream::data_received`], instead of passing them through
    /// [`PduStream::next`] and copying each `Event::Data`.
    #[must_use]
    pub fn payload_wanted(&self) -> Option<(u32, usize, usize)> {
        match &self.state {
            State::Payload {
                data_in: Some((itt, offset)),
                len,
                done,
                ..
            } if done < len => Some((*itt, offset + done, len - done)),
            _ => None,
        }
    }

    /// The whole data length of the Data-In whose payload is arriving
    /// (what [`PduStream::payload_wanted`] counts down from); `None` where
    /// that gives `None`.
    #[must_use]
    pub fn payload_len(&self) -> Option<usize> {
        match &self.state {
            State::Payload {
                data_in: Some(_),
                len,
                done,
                ..
            } if done < len => Some(*len),
            _ => None,
        }
    }

    /// Accounts for payload bytes the caller placed itself (at most the
    /// count [`PduStream::payload_wanted`] gave): digests them and moves
    /// on. The PDU itself comes from the next call of `next`.
    pub fn data_received(&mut self, bytes: &[u8]) {
        let data_digest = self.data_digest;
        if let State::Payload {
            len,
            padded,
            done,
            crc,
            ..
        } = &mut self.state
        {
            let n = bytes.len().min(*len - *done);
            if data_digest {
                *crc = crc32c::crc32c_append(*crc, &bytes[..n]);
            }
            *done += n;
            if *done == *padded {
                self.end_payload();
            }
        }
    }

    /// Header bytes to gather: the BHS first, then AHS and digest.
    fn header_len(&self) -> usize {
        if self.hdr.len() < pdu::BHS_LEN {
            return pdu::BHS_LEN;
        }
        let ahs = usize::from(self.hdr[4]) * 4;
        pdu::BHS_LEN + ahs + if self.header_digest { 4 } else { 0 }
    }

    /// The header is in: checks it and moves on to the payload (or emits
    /// a PDU that has none).
    fn start_payload(&mut self) -> Result<Option<Event<'static>>, StreamError> {
        let at = self.hdr.len() - if self.header_digest { 4 } else { 0 };
        if self.header_digest && self.hdr[at..] != pdu::digest(&self.hdr[..at]) {
            return Err(StreamError::Digest {
                header: false,
                data: true,
            });
        }
        let h = pdu::decode(&self.hdr[..pdu::BHS_LEN])
            .map_err(|e| StreamError::Malformed(e.to_string()))?;
        self.hdr.clear();
        if h.data_len > MAX_DATA {
            return Err(StreamError::TooLarge(h.data_len));
        }
        if h.data_len == 0 {
            return Ok(Some(Event::Pdu {
                pdu: h.pdu,
                payload: Vec::new(),
            }));
        }
        let data_in = match h.pdu {
            TargetPdu::DataIn { itt, offset, .. } => Some((itt, offset as usize)),
            _ => None,
        };
        self.state = State::Payload {
            pdu: h.pdu,
            data_in,
            len: h.data_len,
            padded: pdu::padded(h.data_len),
            done: 0,
            crc: 0,
            gathered: Vec::new(),
        };
        Ok(None)
    }

    /// Payload and padding are in: a digest follows, or the PDU is done.
    fn end_payload(&mut self) {
        if !self.data_digest {
            return;
        }
        if let State::Payload {
            pdu, crc, gathered, ..
        } = std::mem::replace(&mut self.state, State::Header)
        {
            self.state = State::Digest {
                pdu,
                crc,
                got: [0; 4],
                have: 0,
                gathered,
            };
        }
    }

    /// Emits a finished payload's PDU (no digest follows).
    fn emit_if_done(&mut self) -> Option<Event<'static>> {
        match std::mem::replace(&mut self.state, State::Header) {
            State::Payload { pdu, gathered, .. } => Some(Event::Pdu {
                pdu,
                payload: gathered,
            }),
            other => {
                self.state = other;
                None
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::iscsi::pdu::Sn;
    use crate::iscsi::target_pdu::{encode_data_in_header, DataIn};

    const SN: Sn = Sn {
        stat_sn: 5,
        exp_cmd_sn: 6,
        max_cmd_sn: 38,
    };

    /// A Data-In PDU on the wire: header, `data` padded, digests as asked.
    fn data_in(itt: u32, offset: u32, data: &[u8], status: bool, digests: bool) -> Vec<u8> {
        let mut out = encode_data_in_header(&DataIn {
            final_: status,
            status,
            underflow: 0,
            overflow: 0,
            lun: 0,
            itt,
            sn: SN,
            data_sn: 0,
            offset,
            data_len: data.len() as u32,
        })
        .to_vec();
        out.extend_from_slice(data);
        out.resize(pdu::BHS_LEN + pdu::padded(data.len()), 0);
        pdu::add_digests(&mut out, digests, digests);
        out
    }

    /// Data-In bytes gathered: (itt, offset, bytes).
    type Placed = (u32, usize, Vec<u8>);

    /// Feeds `wire` in pieces of `step` bytes; returns the data gathered
    /// per (itt, offset) and the PDUs.
    fn run(
        wire: &[u8],
        step: usize,
        digests: bool,
    ) -> Result<(Vec<Placed>, Vec<TargetPdu>), StreamError> {
        let mut p = PduStream::new(digests, digests);
        let mut data: Vec<Placed> = Vec::new();
        let mut pdus = Vec::new();
        for piece in wire.chunks(step) {
            let mut input = piece;
            while let Some(e) = p.next(&mut input)? {
                match e {
                    Event::Data { itt, offset, bytes } => match data.last_mut() {
                        Some((i, o, d)) if *i == itt && *o + d.len() == offset => {
                            d.extend_from_slice(bytes);
                        }
                        _ => data.push((itt, offset, bytes.to_vec())),
                    },
                    Event::Pdu { pdu, payload } => {
                        assert!(payload.is_empty());
                        pdus.push(pdu);
                    }
                }
            }
            assert!(input.is_empty(), "input left unconsumed");
        }
        Ok((data, pdus))
    }

    #[test]
    fn data_in_split_anywhere_arrives_whole_and_in_place() {
        let a: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
        let b: Vec<u8> = (0..4099u32).map(|i| (i % 7) as u8).collect();
        for digests in [false, true] {
            let mut wire = data_in(9, 0, &a, false, digests);
            wire.extend(data_in(9, 5000, &b, true, digests));
            for step in [1, 3, 47, 48, 49, 4096, 1 << 20] {
                let (data, pdus) = run(&wire, step, digests).unwrap();
                let mut whole = a.clone();
                whole.extend_from_slice(&b);
                assert_eq!(data, vec![(9, 0, whole)], "step {step} digests {digests}");
                assert_eq!(pdus.len(), 2, "step {step}");
                assert!(matches!(
                    pdus[1],
                    TargetPdu::DataIn {
                        has_status: true,
                        itt: 9,
                        ..
                    }
                ));
            }
        }
    }

    /// A reader that received part of a Data-In's data in place still sees
    /// the whole payload's length: the session judges "large, read in
    /// place" by it, not by the tail a short read left.
    #[test]
    fn the_payload_length_stays_whole_while_its_data_arrives() {
        let data = vec![5u8; 64 << 10];
        let wire = data_in(3, 4096, &data, true, false);
        let (hdr, _) = wire.split_at(pdu::BHS_LEN);
        let mut p = PduStream::new(false, false);
        assert_eq!(p.payload_len(), None, "no payload before a header");
        let mut input = hdr;
        assert!(p.next(&mut input).unwrap().is_none());
        assert_eq!(p.payload_wanted(), Some((3, 4096, 64 << 10)));
        assert_eq!(p.payload_len(), Some(64 << 10));
        p.data_received(&data[..60 << 10]);
        assert_eq!(p.payload_wanted(), Some((3, 4096 + (60 << 10), 4 << 10)));
        assert_eq!(
            p.payload_len(),
            Some(64 << 10),
            "the tail's length, not the payload's"
        );
        p.data_received(&data[60 << 10..]);
        assert_eq!(p.payload_wanted(), None);
        assert_eq!(p.payload_len(), None, "a length after the payload is in");
    }

    /// Reads `wire` as the session's direct path does: headers exactly,
    /// Data-In payloads (up to `step` bytes a read) straight into `dest`,
    /// everything else in pieces of `step` through `next`. With `tail`, a
    /// read that completes a payload also takes what `after_payload` names.
    fn run_direct(
        wire: &[u8],
        step: usize,
        digests: bool,
        tail: bool,
        dest: &mut [u8],
    ) -> Result<(Vec<TargetPdu>, usize), StreamError> {
        let mut p = PduStream::new(digests, digests);
        let mut pdus = Vec::new();
        let mut at = 0;
        let mut reads = 0;
        while at < wire.len() {
            reads += 1;
            if let Some((_, offset, left)) = p.payload_wanted() {
                let after = if tail { p.after_payload() } else { 0 };
                let n = (left + after).min(step).min(wire.len() - at);
                let placed = n.min(left);
                dest[offset..offset + placed].copy_from_slice(&wire[at..at + placed]);
                p.data_received(&dest[offset..offset + placed]);
                let mut input = &wire[at + placed..at + n];
                at += n;
                while let Some(e) = p.next(&mut input)? {
                    match e {
                        Event::Data { .. } => panic!("payload passed through next"),
                        Event::Pdu { pdu, .. } => pdus.push(pdu),
                    }
                }
                assert!(input.is_empty(), "the tail went past the next header");
            } else {
                let n = p
                    .until_payload()
                    .unwrap_or(step)
                    .min(step)
                    .min(wire.len() - at);
                let mut input = &wire[at..at + n];
                at += n;
                while let Some(e) = p.next(&mut input)? {
                    match e {
                        Event::Data { .. } => panic!("payload passed through next"),
                        Event::Pdu { pdu, .. } => pdus.push(pdu),
                    }
                }
            }
            // A payload placed in full leaves its PDU to be emitted.
            let mut none: &[u8] = &[];
            while let Some(e) = p.next(&mut none)? {
                if let Event::Pdu { pdu, .. } = e {
                    pdus.push(pdu);
                }
            }
        }
        Ok((pdus, reads))
    }

    #[test]
    fn payload_read_straight_into_place_matches_the_stream() {
        let a: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
        // Not a multiple of 4: padding follows it on the wire.
        let b: Vec<u8> = (0..4099u32).map(|i| (i % 7) as u8).collect();
        let mut whole = a.clone();
        whole.extend_from_slice(&b);
        for digests in [false, true] {
            let mut wire = data_in(9, 0, &a, false, digests);
            wire.extend(data_in(9, 5000, &b, true, digests));
            for (step, tail) in [1, 3, 48, 1000, 4096, 1 << 20]
                .into_iter()
                .flat_map(|s| [(s, false), (s, true)])
            {
                let mut dest = vec![0u8; whole.len()];
                let (pdus, reads) = run_direct(&wire, step, digests, tail, &mut dest).unwrap();
                assert!(dest == whole, "step {step} digests {digests} tail {tail}");
                if step == 1 << 20 {
                    // Header (BHS, then its digest), payload, digest;
                    // again, with padding. The tail takes the digest and
                    // the second header along with the first payload.
                    let want = match (tail, digests) {
                        (true, true) => 4,
                        (true, false) => 3,
                        (false, true) => 8,
                        (false, false) => 5,
                    };
                    assert_eq!(reads, want, "digests {digests} tail {tail}");
                }
                assert_eq!(pdus.len(), 2, "step {step} digests {digests} tail {tail}");
                assert!(matches!(
                    pdus[1],
                    TargetPdu::DataIn {
                        has_status: true,
                        itt: 9,
                        ..
                    }
                ));
            }
        }
        // The data digest covers bytes placed directly too.
        let mut wire = data_in(1, 0, &a, true, true);
        wire[pdu::BHS_LEN + 4 + 10] ^= 1;
        let mut dest = vec![0u8; a.len()];
        assert_eq!(
            run_direct(&wire, 4096, true, true, &mut dest).unwrap_err(),
            StreamError::Digest {
                header: true,
                data: false
            }
        );
    }

    #[test]
    fn a_corrupted_payload_or_header_fails_its_digest() {
        let d = vec![7u8; 1000];
        let mut wire = data_in(1, 0, &d, true, true);
        wire[pdu::BHS_LEN + 4 + 10] ^= 1;
        assert_eq!(
            run(&wire, 100, true).unwrap_err(),
            StreamError::Digest {
                header: true,
                data: false
            }
        );
        let mut wire = data_in(1, 0, &d, true, true);
        wire[20] ^= 1;
        assert!(matches!(
            run(&wire, 100, true).unwrap_err(),
            StreamError::Digest { header: false, .. }
        ));
    }

    #[test]
    fn an_oversized_segment_is_refused_before_it_is_read() {
        let mut wire = data_in(1, 0, &[], true, false);
        wire[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(
            run(&wire, 48, false).unwrap_err(),
            StreamError::TooLarge(_)
        ));
    }
}
