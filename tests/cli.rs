//! Drives the real `imgcache` binary: `serve` on a tempdir state directory under /dev/shm
//! (no TCP listener) and the `image` commands against it.
//!
//! Tests that start a daemon need the real catalog and image code (the signature stubs make
//! `serve` fail at "cannot open the catalog"); the others run against anything.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::Digest as _;

const BIN: &str = env!("CARGO_BIN_EXE_imgcache");

fn state_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("imgcache-test-")
        .tempdir_in("/dev/shm")
        .expect("create a state directory under /dev/shm")
}

/// `imgcache ARGS` with the test's state directory; no inherited imgcache environment.
fn imgcache(state: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("IMGCACHE_SOCKET")
        .env("IMGCACHE_STATE_DIR", state)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run imgcache")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A running `imgcache serve`, stopped (SIGKILL) if the test did not stop it.
struct Daemon {
    child: Option<Child>,
    log: PathBuf,
    state: PathBuf,
}

impl Daemon {
    fn start(state: &Path) -> Daemon {
        let mut d = Daemon::spawn(state, &[]);
        d.wait_ready();
        d
    }

    fn spawn(state: &Path, extra: &[&str]) -> Daemon {
        let log = state.with_extension("log");
        let child = Command::new(BIN)
            // Killed with SIGKILL on drop: no FUSE mount to leave behind.
            .args(["serve", "--nbd-tcp", "off", "--fuse-mount", "off"])
            .args(["--log-level", "debug"])
            .args(extra)
            .env("IMGCACHE_STATE_DIR", state)
            .env_remove("IMGCACHE_SOCKET")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("spawn imgcache serve");
        Daemon {
            child: Some(child),
            log,
            state: state.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let sock = self.state.join("control.sock");
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if UnixStream::connect(&sock).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "daemon exited ({status}) at start-up; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("daemon did not start; its log:\n{}", self.log());
    }

    fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().unwrap().id() as i32;
        // SAFETY: kill(2) with the pid of our own child process; no memory is passed.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// Wait for the daemon to exit; its exit status code.
    fn wait(&mut self, limit: Duration) -> Option<i32> {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("daemon did not exit in {limit:?}; its log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A raw file of `len` bytes with a non-repeating pattern and a hole-like zero run.
fn raw_file(dir: &Path, len: usize) -> PathBuf {
    let path = dir.join("disk.raw");
    let mut data = vec![0u8; len];
    for (i, b) in data.iter_mut().enumerate().take(len / 2) {
        *b = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1];
    }
    std::fs::write(&path, &data).unwrap();
    path
}

/// A raw HTTP/1.1 request on the control socket; the status code and body.
fn http(state: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = UnixStream::connect(state.join("control.sock")).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp[9..12].parse().unwrap();
    let body = resp.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (status, body.to_string())
}

// ---- tests that need no running daemon ----

#[test]
fn version_flag_prints_version() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        stdout(&out).trim(),
        format!("imgcache {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn config_with_unknown_key_is_rejected_naming_key_and_file() {
    let dir = state_dir();
    let cfg = dir.path().join("imgcache.toml");
    std::fs::write(&cfg, "nbd-tcp = \"off\"\nchunk-size = \"1M\"\n").unwrap();
    let out = imgcache(dir.path(), &["serve", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("chunk-size"), "{err}");
    assert!(err.contains(&format!("{}:2:1", cfg.display())), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn config_with_bad_address_is_rejected() {
    let dir = state_dir();
    let cfg = dir.path().join("imgcache.toml");
    std::fs::write(&cfg, "nbd-tcp = \"localhost:99999\"\n").unwrap();
    let out = imgcache(dir.path(), &["serve", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("invalid nbd-tcp"), "{}", stderr(&out));
}

#[test]
fn serve_refuses_a_locked_state_dir_naming_the_pid() {
    let dir = state_dir();
    let lock = File::options()
        .create(true)
        .truncate(true)
        .write(true)
        .open(dir.path().join("lock"))
        .unwrap();
    (&lock).write_all(b"4242\n").unwrap();
    // SAFETY: flock on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(rc, 0);
    let out = imgcache(dir.path(), &["serve", "--nbd-tcp", "off"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim().lines().last().unwrap_or(""),
        format!(
            "error: another imgcache daemon (pid 4242) is using {}",
            dir.path().display()
        )
    );
}

#[test]
fn cli_without_daemon_says_to_start_it() {
    let dir = state_dir();
    let out = imgcache(dir.path(), &["image", "list"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let sock = dir.path().join("control.sock");
    assert!(
        err.starts_with(&format!(
            "error: cannot reach the imgcache daemon at {}: is `imgcache serve` running?",
            sock.display()
        )),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn socket_flag_wins_over_state_dir() {
    let dir = state_dir();
    let out = imgcache(
        dir.path(),
        &["--socket", "/nonexistent/x.sock", "image", "list"],
    );
    assert!(
        stderr(&out).contains("/nonexistent/x.sock"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn invalid_image_name_is_rejected_before_connecting() {
    let dir = state_dir();
    let out = imgcache(dir.path(), &["image", "add", "bad/name", "--file", "/x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("invalid image name"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("panicked"));
}

#[test]
fn invalid_enum_value_lists_the_valid_ones() {
    let dir = state_dir();
    let out = imgcache(
        dir.path(),
        &[
            "image",
            "add",
            "a",
            "--file",
            "/x",
            "--disk-format",
            "qcow3",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("raw, qcow2, vmdk, iso"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_size_is_rejected() {
    let dir = state_dir();
    let out = imgcache(
        dir.path(),
        &["image", "add", "a", "--file", "/x", "--min-ram", "1Q"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("invalid size \"1Q\""),
        "{}",
        stderr(&out)
    );
}

#[test]
fn chunk_size_not_power_of_two_is_rejected() {
    let dir = state_dir();
    let out = imgcache(
        dir.path(),
        &["image", "add", "a", "--file", "/x", "--chunk-size", "3M"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("power of two"), "{}", stderr(&out));
}

#[test]
fn malformed_checksum_is_rejected() {
    let dir = state_dir();
    let out = imgcache(
        dir.path(),
        &["image", "add", "a", "--file", "/x", "--checksum", "md5:123"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("32 hexadecimal digits"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn set_with_nothing_to_change_is_an_error() {
    let dir = state_dir();
    let out = imgcache(dir.path(), &["image", "set", "a"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("nothing to change"),
        "{}",
        stderr(&out)
    );
}

// ---- tests that start a daemon (need the catalog and image work merged) ----

#[test]
fn sigterm_stops_cleanly_and_removes_sockets() {
    let dir = state_dir();
    let mut d = Daemon::start(dir.path());
    assert!(dir.path().join("nbd.sock").exists());
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait(Duration::from_secs(15)), Some(0), "{}", d.log());
    assert!(!dir.path().join("control.sock").exists());
    assert!(!dir.path().join("nbd.sock").exists());
}

#[test]
fn sigint_stops_cleanly() {
    let dir = state_dir();
    let mut d = Daemon::start(dir.path());
    d.signal(libc::SIGINT);
    assert_eq!(d.wait(Duration::from_secs(15)), Some(0), "{}", d.log());
}

#[test]
fn control_socket_is_group_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = state_dir();
    let _d = Daemon::start(dir.path());
    let mode = std::fs::metadata(dir.path().join("control.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660);
}

#[test]
fn second_daemon_on_same_state_dir_is_refused() {
    let dir = state_dir();
    let first = Daemon::start(dir.path());
    let pid = first.child.as_ref().unwrap().id();
    let out = imgcache(dir.path(), &["serve", "--nbd-tcp", "off"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!(
            "another imgcache daemon (pid {pid}) is using {}",
            dir.path().display()
        )),
        "{}",
        stderr(&out)
    );
    // The first daemon is unaffected.
    assert!(imgcache(dir.path(), &["image", "list"]).status.success());
}

#[test]
fn stale_sockets_of_a_killed_daemon_are_replaced() {
    let dir = state_dir();
    let mut first = Daemon::start(dir.path());
    first.signal(libc::SIGKILL);
    first.wait(Duration::from_secs(5));
    assert!(dir.path().join("control.sock").exists());
    let _second = Daemon::start(dir.path());
    assert!(imgcache(dir.path(), &["image", "list"]).status.success());
}

#[test]
fn health_answers_with_the_daemon_pid() {
    let dir = state_dir();
    let d = Daemon::start(dir.path());
    let (status, body) = http(dir.path(), "GET", "/v1/health", "");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["pid"], d.child.as_ref().unwrap().id());
}

#[test]
fn malformed_json_gets_a_400_in_the_error_shape() {
    let dir = state_dir();
    let _d = Daemon::start(dir.path());
    let (status, body) = http(dir.path(), "POST", "/v1/images", "{not json");
    assert_eq!(status, 400, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["kind"], "invalid_input");
    assert!(!v["error"]["message"].as_str().unwrap().is_empty());
}

#[test]
fn unknown_request_field_is_named_in_the_400() {
    let dir = state_dir();
    let _d = Daemon::start(dir.path());
    let (status, body) = http(
        dir.path(),
        "POST",
        "/v1/images",
        r#"{"name":"a","file":"/x","colour":"red"}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("colour"), "{body}");
}

#[test]
fn unknown_image_is_a_404_and_exit_1() {
    let dir = state_dir();
    let _d = Daemon::start(dir.path());
    let (status, body) = http(dir.path(), "GET", "/v1/images/nope", "");
    assert_eq!(status, 404, "{body}");
    let out = imgcache(dir.path(), &["image", "show", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).starts_with("error: "), "{}", stderr(&out));
}

#[test]
fn image_lifecycle_end_to_end() {
    let dir = state_dir();
    let _d = Daemon::start(dir.path());
    let file = raw_file(dir.path(), 3 << 20);
    let data = std::fs::read(&file).unwrap();
    let md5 = hex::encode(md5::Md5::digest(&data));
    let sha256 = hex::encode(sha2::Sha256::digest(&data));

    // add
    let out = imgcache(
        dir.path(),
        &[
            "image",
            "add",
            "debian 12",
            "--file",
            file.to_str().unwrap(),
            "--chunk-size",
            "64K",
            "--checksum",
            &format!("sha256:{sha256}"),
            "--arch",
            "x86_64",
            "--tag",
            "base",
            "--property",
            "hw_disk_bus=virtio",
            "--visibility",
            "public",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains(&md5), "{text}");
    assert!(text.contains(&sha256), "{text}");
    assert!(text.contains("3145728 bytes"), "{text}");

    // list
    let out = imgcache(dir.path(), &["image", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("NAME"), "{text}");
    assert!(text.contains("debian 12"), "{text}");
    assert!(text.contains("active"), "{text}");

    // show --json
    let out = imgcache(dir.path(), &["image", "show", "debian 12", "--json"]);
    let row: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(row["virtual_size"], 3 << 20);
    assert_eq!(row["visibility"], "public");
    assert_eq!(row["properties"]["hw_disk_bus"], "virtio");
    let id = row["id"].as_str().unwrap().to_string();

    // set: rename, property merge, protect
    let out = imgcache(
        dir.path(),
        &[
            "image",
            "set",
            &id,
            "--name",
            "debian-12",
            "--property",
            "os_distro=debian",
            "--protected",
            "--tag",
            "lts",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = imgcache(dir.path(), &["image", "show", "debian-12", "--json"]);
    let row: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(row["properties"]["hw_disk_bus"], "virtio");
    assert_eq!(row["properties"]["os_distro"], "debian");
    assert_eq!(row["protected"], true);
    assert_eq!(row["tags"], serde_json::json!(["base", "lts"]));

    // a protected image cannot be deleted
    let out = imgcache(dir.path(), &["image", "delete", "debian-12"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let out = imgcache(dir.path(), &["image", "set", "debian-12", "--unprotected"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // delete → recycle bin → recover
    assert!(imgcache(dir.path(), &["image", "delete", "debian-12"])
        .status
        .success());
    assert!(!stdout(&imgcache(dir.path(), &["image", "list"])).contains("debian-12"));
    assert!(stdout(&imgcache(dir.path(), &["image", "list", "--all"])).contains("deleted"));
    assert!(imgcache(dir.path(), &["image", "recover", "debian-12"])
        .status
        .success());
    let out = imgcache(dir.path(), &["image", "show", "debian-12"]);
    assert!(
        stdout(&out).contains("status:           active"),
        "{}",
        stdout(&out)
    );

    // disable / enable
    let out = imgcache(dir.path(), &["image", "disable", "debian-12"]);
    assert!(stdout(&out).contains("disabled"), "{}", stderr(&out));
    assert!(imgcache(dir.path(), &["image", "enable", "debian-12"])
        .status
        .success());

    // expunge needs delete first, then removes the row and its chunks
    let out = imgcache(dir.path(), &["image", "expunge", "debian-12"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(imgcache(dir.path(), &["image", "delete", "debian-12"])
        .status
        .success());
    assert!(imgcache(dir.path(), &["image", "expunge", "debian-12"])
        .status
        .success());
    let out = imgcache(dir.path(), &["image", "list", "--all", "--json"]);
    assert_eq!(stdout(&out).trim(), "[]");
    assert!(store_is_empty(&dir.path().join("store")));
}

#[test]
fn failed_add_leaves_no_row_and_no_chunks() {
    let dir = state_dir();
    let _d = Daemon::start(dir.path());
    let file = raw_file(dir.path(), 1 << 20);
    let wrong = format!("md5:{}", "0".repeat(32));
    let out = imgcache(
        dir.path(),
        &[
            "image",
            "add",
            "bad",
            "--file",
            file.to_str().unwrap(),
            "--checksum",
            &wrong,
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).starts_with("error: "), "{}", stderr(&out));
    let out = imgcache(dir.path(), &["image", "list", "--all", "--json"]);
    assert_eq!(stdout(&out).trim(), "[]");
    assert!(store_is_empty(&dir.path().join("store")));
    // The name is free again.
    let out = imgcache(
        dir.path(),
        &["image", "add", "bad", "--file", file.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn duplicate_name_is_refused() {
    let dir = state_dir();
    let _d = Daemon::start(dir.path());
    let file = raw_file(dir.path(), 256 << 10);
    let f = file.to_str().unwrap();
    assert!(imgcache(dir.path(), &["image", "add", "x", "--file", f])
        .status
        .success());
    let out = imgcache(dir.path(), &["image", "add", "x", "--file", f]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("exists already"), "{}", stderr(&out));
}

#[test]
fn relative_file_path_is_resolved_by_the_cli() {
    let dir = state_dir();
    let _d = Daemon::start(dir.path());
    raw_file(dir.path(), 128 << 10);
    let out = Command::new(BIN)
        .args(["image", "add", "rel", "--file", "disk.raw"])
        .current_dir(dir.path())
        .env("IMGCACHE_STATE_DIR", dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

/// No regular file anywhere under `dir` (chunks and manifests all gone).
fn store_is_empty(dir: &Path) -> bool {
    fn walk(d: &Path) -> bool {
        std::fs::read_dir(d).map_or(true, |rd| {
            rd.flatten().all(|e| {
                let ft = e.file_type().unwrap();
                if ft.is_dir() {
                    walk(&e.path())
                } else {
                    e.file_name().to_string_lossy().starts_with('.')
                }
            })
        })
    }
    walk(dir)
}
