//! containerd's runtime options (the `options` Any of a task create: `runtimeoptions.v1.Options`
//! in protobuf) through decoding, and an inline ConfigBody through config parsing. Never touches
//! a file: a ConfigPath is only decoded.
//!
//! Input: the Any's type URL, a NUL byte, then its value (protobuf bytes).
//!
//! Invariants: nothing panics; only `runtimeoptions.v1.Options` (under any URL prefix) is
//! accepted; an empty Any means the default configuration.

#![no_main]

use accordion_runtime::config::Config;
use accordion_runtime::shim::options::{config_source, ConfigSource, OptionsError};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (type_url, value) = match data.iter().position(|&b| b == 0) {
        Some(nul) => (&data[..nul], &data[nul + 1..]),
        None => (data, &[][..]),
    };
    let any = Any {
        type_url: String::from_utf8_lossy(type_url).into_owned(),
        value: value.to_vec(),
        ..Default::default()
    };
    let accepted_type = any.type_url.rsplit('/').next() == Some("runtimeoptions.v1.Options");
    match config_source(Some(&any)) {
        Ok(ConfigSource::Body(body)) => {
            assert!(accepted_type);
            assert!(!body.trim().is_empty());
            let _ = Config::parse(std::path::Path::new("<runtime option ConfigBody>"), &body);
        }
        Ok(ConfigSource::Path(path)) => {
            assert!(accepted_type);
            assert!(!path.as_os_str().is_empty());
        }
        Ok(ConfigSource::Default) => {
            assert!(accepted_type || (any.type_url.is_empty() && any.value.is_empty()));
        }
        Err(OptionsError::Type(url)) => {
            assert!(!accepted_type);
            assert_eq!(url, any.type_url);
        }
        Err(OptionsError::Decode(_)) => assert!(accepted_type),
        Err(e) => panic!("decoding alone gave {e}"),
    }
});
