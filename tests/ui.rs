//! Compile-time behaviour of `case_optimizer!`: every compile error a user can meet, as the
//! user sees it (tests/ui/*.rs with reviewed .stderr snapshots), and programs that must
//! compile and run (tests/ui/pass/*.rs).
//!
//! trybuild builds these in its own target directory; the first run compiles tch there.
//! Regenerate snapshots with `TRYBUILD=overwrite` and review the diff like code.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
    t.pass("tests/ui/pass/*.rs");
}
