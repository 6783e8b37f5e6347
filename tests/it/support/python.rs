//! A Python interpreter with `grpcio`, `grpcio-tools` and `cryptography`, for
//! tests that check the daemon against gRPC's C-core TLS stack (what most
//! generated stubs use) and against a crypto library that is not ring.
//!
//! `.ci/run` makes a throwaway virtualenv and sets `MOSAIC_TEST_PYTHON`; without it
//! the tests make one under cargo's target tmp dir, once, behind a lock file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Names the interpreter to use.
pub const PYTHON_VARIABLE: &str = "MOSAIC_TEST_PYTHON";
const PACKAGES: [&str; 6] = [
    "grpcio",
    "grpcio-tools",
    "grpcio-reflection",
    "grpcio-health-checking",
    "protobuf",
    "cryptography",
];

/// Takes the lock file `lock` (made anew: whoever made it holds it), waiting
/// while another test process holds it, for at most 300 s: then it was left
/// by a test killed while holding it, and is taken over. The holder removes
/// the file to release it.
pub fn take_lock(lock: &Path) {
    let started = Instant::now();
    loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(lock)
        {
            Ok(_) => return,
            Err(_) if started.elapsed() < Duration::from_secs(300) => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(_) => {
                let _ = std::fs::remove_file(lock);
            }
        }
    }
}

/// The path of a Python that can `import grpc, grpc_tools, cryptography`
/// (`MOSAIC_TEST_PYTHON` is taken as it is: `.ci/run` installs all of them).
pub fn python_with_grpcio() -> PathBuf {
    if let Some(python) = std::env::var_os(PYTHON_VARIABLE).filter(|value| !value.is_empty()) {
        return PathBuf::from(python);
    }
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("python-grpcio");
    let python = venv.join("bin").join("python");
    let lock = venv.with_extension("lock");
    take_lock(&lock);
    let ready = python.exists()
        && Command::new(&python)
            .args([
                "-c",
                "import grpc, grpc_tools, grpc_reflection, grpc_health, cryptography",
            ])
            .status()
            .is_ok_and(|status| status.success());
    if !ready {
        let created = Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv)
            .status()
            .expect("run python3 -m venv");
        assert!(created.success(), "python3 -m venv failed");
        let installed = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(PACKAGES)
            .status()
            .expect("run pip");
        assert!(installed.success(), "pip install {PACKAGES:?} failed");
    }
    let _ = std::fs::remove_file(&lock);
    python
}
