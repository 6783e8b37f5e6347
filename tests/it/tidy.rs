//! Tidy checks that keep the tree readable: every Rust file opens with a `//!` line
//! saying what it is for, and every proto element carries a comment.

use std::path::{Path, PathBuf};

fn files_with_extension(root: &Path, extension: &str, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            files_with_extension(&path, extension, out);
        } else if path.extension().is_some_and(|found| found == extension) {
            out.push(path);
        }
    }
}

#[test]
fn every_rust_file_starts_with_a_module_doc() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for directory in ["src", "tests", "examples", "benches", "fuzz"] {
        files_with_extension(&root.join(directory), "rs", &mut files);
    }
    files.push(root.join("build.rs"));
    assert!(files.len() > 10, "the walk found the sources");
    let missing: Vec<String> = files
        .iter()
        .filter(|file| {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            !text.trim_start().starts_with("//!")
        })
        .map(|file| {
            file.strip_prefix(root)
                .unwrap_or(file)
                .display()
                .to_string()
        })
        .collect();
    assert!(
        missing.is_empty(),
        "files without a `//!` first line: {missing:?}"
    );
}

#[test]
fn every_proto_service_rpc_message_and_field_has_a_comment() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    files_with_extension(&root.join("proto"), "proto", &mut files);
    assert!(files.len() >= 3, "the walk found the protos");
    let mut uncommented = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let mut previous = "";
        for (number, line) in text.lines().enumerate() {
            let trimmed = line.trim();
            let is_declaration = trimmed.starts_with("service ")
                || trimmed.starts_with("rpc ")
                || trimmed.starts_with("message ")
                || trimmed.starts_with("enum ")
                || trimmed.starts_with("oneof ")
                || (trimmed.ends_with(';')
                    && trimmed.contains(" = ")
                    && !trimmed.starts_with("option ")
                    && !trimmed.starts_with("syntax ")
                    && !trimmed.starts_with("//"));
            if is_declaration && !previous.starts_with("//") {
                uncommented.push(format!("{}:{}: {trimmed}", file.display(), number + 1));
            }
            if !trimmed.is_empty() {
                previous = trimmed;
            }
        }
    }
    assert!(
        uncommented.is_empty(),
        "uncommented proto elements:\n{}",
        uncommented.join("\n")
    );
}
