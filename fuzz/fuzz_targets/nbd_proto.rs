//! Feeds arbitrary bytes to every NBD parser: option headers, option payloads, client
//! flags and request headers (then the request checker). None may panic; parsed requests
//! must re-encode to the same bytes.
#![no_main]

use imgcache::export::nbd::proto::{self, Negotiated};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        let _ = proto::parse_client_flags(u32::from_be_bytes(data[..4].try_into().unwrap()));
    }
    if let Ok(h) = <[u8; 16]>::try_from(data.get(..16).unwrap_or(&[])) {
        let _ = proto::parse_option_header(&h);
    }
    if let Some((&sel, rest)) = data.split_first() {
        // Options 0..=12 cover every known option and some unknown ones.
        let _ = proto::parse_option(u32::from(sel % 13), rest);
    }
    if let Ok(b) =
        <[u8; proto::REQUEST_LEN]>::try_from(data.get(..proto::REQUEST_LEN).unwrap_or(&[]))
    {
        if let Ok(req) = proto::parse_request(&b) {
            let mut v = Vec::new();
            proto::encode_request(&mut v, &req);
            assert_eq!(v, b);
            let size = u64::from(data.get(28).copied().unwrap_or(0)) << 20;
            for writable in [false, true] {
                let neg = Negotiated {
                    size,
                    writable,
                    structured: true,
                    block_status: true,
                };
                let _ = proto::check_request(&req, &neg);
            }
        }
    }
});
