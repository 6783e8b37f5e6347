//! A `node_modules` with `@grpc/grpc-js` and `@grpc/proto-loader`, for the Node
//! client test: the versions pinned by `examples/node/package.json` and its lock.
//!
//! `.ci/run` installs them into its scratch dir and sets `MOSAIC_TEST_NODE_MODULES`;
//! without it the tests run `npm ci` under cargo's target tmp dir, once, behind a
//! lock file (as the Python helper makes its virtualenv), and again only when the
//! example's package files change.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Names a directory whose `node_modules` holds the example's packages (the
/// `npm install --prefix` dir); the `node_modules` dir itself is accepted too.
pub const NODE_MODULES_VARIABLE: &str = "MOSAIC_TEST_NODE_MODULES";
/// The files that say what to install, copied next to the installed packages
/// so a change to either triggers a new install.
const PACKAGE_FILES: [&str; 2] = ["package.json", "package-lock.json"];

/// The Node example's directory in this repository.
pub fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/node")
}

/// The `node_modules` directory to put on `NODE_PATH` for the example.
pub fn node_modules_with_grpc() -> PathBuf {
    if let Some(dir) = std::env::var_os(NODE_MODULES_VARIABLE).filter(|value| !value.is_empty()) {
        let dir = PathBuf::from(dir);
        let nested = dir.join("node_modules");
        return if nested.is_dir() { nested } else { dir };
    }
    let prefix = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("node-grpc");
    let lock = prefix.with_extension("lock");
    crate::support::python::take_lock(&lock);
    let node_modules = prefix.join("node_modules");
    if !(installed_from_current_package_files(&prefix) && packages_load(&node_modules)) {
        let _ = std::fs::remove_dir_all(&prefix);
        std::fs::create_dir_all(&prefix).expect("create the node_modules prefix");
        for file in PACKAGE_FILES {
            std::fs::copy(example_dir().join(file), prefix.join(file))
                .unwrap_or_else(|error| panic!("copy examples/node/{file}: {error}"));
        }
        let installed = Command::new("npm")
            .args(["ci", "--silent", "--no-audit", "--no-fund", "--prefix"])
            .arg(&prefix)
            .status()
            .expect("run npm (is Node installed?)");
        assert!(
            installed.success(),
            "npm ci of examples/node/package.json failed"
        );
    }
    let _ = std::fs::remove_file(&lock);
    node_modules
}

/// True when `prefix` holds copies of the example's current package files.
fn installed_from_current_package_files(prefix: &Path) -> bool {
    PACKAGE_FILES.iter().all(|file| {
        let wanted = std::fs::read(example_dir().join(file));
        let installed = std::fs::read(prefix.join(file));
        matches!((wanted, installed), (Ok(wanted), Ok(installed)) if wanted == installed)
    })
}

/// True when Node can load both packages from `node_modules`.
fn packages_load(node_modules: &Path) -> bool {
    Command::new("node")
        .args([
            "-e",
            "require('@grpc/grpc-js'); require('@grpc/proto-loader')",
        ])
        .env("NODE_PATH", node_modules)
        .status()
        .is_ok_and(|status| status.success())
}
