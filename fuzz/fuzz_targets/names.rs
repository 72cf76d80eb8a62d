//! Host-name resolution (names typed by users and passed by ssh/rsync/git).
#![no_main]
use libfuzzer_sys::fuzz_target;

const FILE: &str = r#"
[cluster-manager]
id52 = "000g40o40k30e209185go38e1s8124gj2gahc5oo34d1m70t3ofg"
alias = "amitu.com"

[server.foo]
id52 = "0g2081040g2081040g2081040g2081040g2081040g2081040g20"
allow-from = "alice"

[server.foo.service.django]
http = 8000

[device.alice]
id52 = "1040g2081040g2081040g2081040g2081040g2081040g2081040"

[group.admins]
members = "alice, foo"
"#;

fuzz_target!(|data: &[u8]| {
    static CFG: std::sync::OnceLock<Vec<(String, malai::config::ClusterConfig)>> =
        std::sync::OnceLock::new();
    let clusters = CFG.get_or_init(|| {
        let c = malai::config::ClusterConfig::parse(FILE).expect("fuzz seed config parses");
        vec![("amitu.com".to_string(), c)]
    });
    if let Ok(host) = std::str::from_utf8(data) {
        let _ = malai::config::names::resolve(clusters, host);
    }
});
