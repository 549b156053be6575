//! G9 across processes: the same seed run by two separate `auditflow sim`
//! processes gives the same trace hash (no hash-map order, wall clock or
//! OS randomness leaks into a run).

use std::process::Command;

fn trace_of(seed: u64) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_auditflow"))
        .args(["sim", "--seed", &seed.to_string(), "--duration", "10"])
        .env("AUDITFLOW_LOG", "off")
        .output()
        .expect("run auditflow sim");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "seed {seed} failed:\n{text}");
    let line = text.lines().next().expect("a result line").to_string();
    line.split(" trace ")
        .nth(1)
        .expect("trace hash in the result line")
        .trim()
        .to_string()
}

#[test]
fn same_seed_same_trace_in_two_processes() {
    for seed in [1, 99] {
        assert_eq!(trace_of(seed), trace_of(seed), "seed {seed}");
    }
}
