use std::time::Instant;
fn main() {
    let data = vec![7u8; 256 << 20];
    let t = Instant::now();
    let _ = <md5::Md5 as md5::Digest>::digest(&data);
    println!("md5 {:.0} MiB/s", 256.0 / t.elapsed().as_secs_f64());
    let t = Instant::now();
    let _ = <sha2::Sha256 as sha2::Digest>::digest(&data);
    println!("sha256 {:.0} MiB/s", 256.0 / t.elapsed().as_secs_f64());
    let t = Instant::now();
    for c in data.chunks(1 << 20) {
        let _ = blake3::hash(c);
    }
    println!("blake3 {:.0} MiB/s", 256.0 / t.elapsed().as_secs_f64());
    let t = Instant::now();
    let mut z = 0;
    for c in data.chunks(1 << 20) {
        if imgcache::image::import::is_all_zero(c) {
            z += 1;
        }
    }
    println!("zero {:.0} MiB/s {z}", 256.0 / t.elapsed().as_secs_f64());
    let z = vec![0u8; 256 << 20];
    let t = Instant::now();
    let mut n = 0;
    for c in z.chunks(1 << 20) {
        if imgcache::image::import::is_all_zero(c) {
            n += 1;
        }
    }
    println!(
        "zero(all-zero) {:.0} MiB/s {n}",
        256.0 / t.elapsed().as_secs_f64()
    );
}
