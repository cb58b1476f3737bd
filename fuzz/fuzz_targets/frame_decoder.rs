//! Fuzz target for the migration frame decoder: any bytes a peer could send.
//!
//! Checks: decoding never panics; a frame that decodes re-encodes to exactly the bytes it was
//! decoded from (the encoding is canonical, so nothing is silently accepted and changed); the
//! units of a batch decompress or fail cleanly; the stream reader agrees with the slice
//! decoder on where frames end.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmgate_migrate::protocol::{Decoded, FrameReader, Message, UnitDecoder, decode_frame};

fuzz_target!(|data: &[u8]| {
    let mut offset = 0;
    let mut slice_frames = 0usize;
    // Decode frames back to back, as a receiver with a buffer would.
    while let Some(rest) = data.get(offset..) {
        let Ok(Decoded::Frame { frame, consumed }) = decode_frame(rest) else {
            break;
        };
        let mut again = Vec::new();
        frame
            .message
            .encode(frame.version, &mut again)
            .expect("a decoded frame re-encodes");
        assert_eq!(Some(again.as_slice()), rest.get(..consumed), "canonical encoding");
        let units = match &frame.message {
            Message::MemoryBatch(b) => Some(*b.pages()),
            Message::DiskBlocks(b) => Some(*b.blocks()),
            _ => None,
        };
        if let Some(units) = units {
            let mut decoder = UnitDecoder::new();
            let mut out = vec![0u8; 65536];
            for unit in units.iter() {
                if let Some(out) = out.get_mut(..unit.unit_size()) {
                    let _ = decoder.decode(&unit, out);
                }
            }
        }
        slice_frames += 1;
        offset += consumed;
    }
    // The stream reader reads the same frames.
    let mut reader = FrameReader::new(data);
    let mut read_frames = 0usize;
    while let Ok(Some(_)) = reader.read_frame() {
        read_frames += 1;
    }
    assert_eq!(slice_frames, read_frames, "reader and decoder agree");
});
