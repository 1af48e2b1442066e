//! Declares the `fuzzing` cfg (set by cargo-fuzz) so test helpers can be
//! shared with fuzz targets.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(fuzzing)");
}
