//! Fuzz target for the destination's state machine: a sequence of frames (each prefixed by a
//! channel byte) from a source that may do anything. Checks that no sequence panics and that
//! once the VM runs here, no message makes the state machine discard it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmgate_migrate::protocol::{
    Decoded, ReceiverAction, ReceiverPolicy, ReceiverState, Verdict, decode_frame,
};

fuzz_target!(|data: &[u8]| {
    let mut state = ReceiverState::new(ReceiverPolicy::new("vmgate fuzz"));
    let mut rest = data;
    while let Some((&channel, tail)) = rest.split_first() {
        let Ok(Decoded::Frame { frame, consumed }) = decode_frame(tail) else {
            break;
        };
        rest = tail.get(consumed..).unwrap_or_default();
        let owned_before = state.owns_vm();
        let step = match state.on_message(u16::from(channel % 4), &frame) {
            Ok(step) => step,
            Err(rejected) => rejected.then,
        };
        if owned_before {
            assert!(
                !matches!(step.action, ReceiverAction::Discard { .. }),
                "a resumed VM was discarded"
            );
        }
        state = step.state;
        // Drive the engine side the happy way so later messages reach the later states.
        state = match step.action {
            ReceiverAction::CheckConfig => match state.on_verdict(Verdict::Compatible) {
                Ok(s) => s.state,
                Err(r) => r.then.state,
            },
            ReceiverAction::Resume => match state.on_resumed() {
                Ok(s) => s.state,
                Err(r) => r.then.state,
            },
            _ => state,
        };
    }
});
