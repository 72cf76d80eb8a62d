//! The exec frame stream (network input for the whole life of an exec session).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut r = data;
    while let Ok(Some(f)) = rt.block_on(malai::protocol::exec::read(&mut r)) {
        // Whatever decodes must re-encode to something that decodes the same.
        let bytes = f.encode();
        let mut again = &bytes[..];
        let back = rt
            .block_on(malai::protocol::exec::read(&mut again))
            .unwrap();
        assert_eq!(back.as_ref(), Some(&f));
    }
});
