use super::*;

#[test]
fn crash_harness_few_hundred_rounds() {
    let s = harness::run(1000, 300);
    assert!(s.failures.is_empty(), "{}", s.failures.join("\n"));
    assert_eq!(s.rounds, 300);
}
