//! The request header decoder (network input on every stream): framing + JSON body.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut r = data;
    let _ = rt.block_on(malai::protocol::read_header(&mut r));
    let _ = malai::protocol::decode_header(data);
});
