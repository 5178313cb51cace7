//! Configuration loading from hostile TOML: `spillway::config::Config::from_toml` (the
//! processor) and `spillway::ingress::config::IngressConfig::from_toml` (the ingress), i.e.
//! figment's TOML provider, serde's `deny_unknown_fields` types and the cross-field rules.
//!
//! Input format: UTF-8 TOML text (anything else is skipped). `{ env = .. }` / `{ file = .. }`
//! secrets are only resolved at start-up, not by these functions, so nothing here reads the
//! environment or files.
//!
//! Checks: nothing panics (rules with arithmetic on fuzzed numbers, URL parsing, rate parsing);
//! a configuration that loads validates again, and formats with `Debug`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use spillway::ingress::config::IngressConfig;
use spillway::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::from_toml(text) {
        config
            .validate()
            .expect("a loaded processor config validates again");
        let _ = format!("{config:?}");
    }
    if let Ok(config) = IngressConfig::from_toml(text) {
        config
            .validate()
            .expect("a loaded ingress config validates again");
        let _ = format!("{config:?}");
    }
});
