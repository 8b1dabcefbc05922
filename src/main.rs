fn main() {
    println!("imgcache: not built yet");
}
