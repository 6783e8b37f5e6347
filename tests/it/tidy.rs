//! Tidy checks that keep the tree readable: every Rust file opens with a `//!` line
//! saying what it is for, every proto element carries a comment, and the README's
//! configuration reference names every file key and `MOSAIC_*` variable the code
//! reads, with an example file the daemon's loader accepts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every file under `root` with `extension`, skipping `target` and hidden
/// folders.
pub(crate) fn files_with_extension(root: &Path, extension: &str, out: &mut Vec<PathBuf>) {
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

/// README.md's text.
fn readme() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    std::fs::read_to_string(&path).expect("read README.md")
}

/// The README's `## Configuration` section, up to the next `## ` heading.
fn configuration_section(readme: &str) -> &str {
    let start = readme
        .find("\n## Configuration\n")
        .expect("README.md has a `## Configuration` section");
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |end| end + 4);
    &rest[..end]
}

/// The text between the first pair of backticks in `text`, if any.
fn first_code_span(text: &str) -> Option<&str> {
    let (_, rest) = text.split_once('`')?;
    let (span, _) = rest.split_once('`')?;
    Some(span)
}

/// The file keys the reference documents, by file section: `""` for the top
/// level (a `### Top level` heading), `instance` for a ``### `[instance]` ``
/// heading. A key is the code span in a table row's first cell. Headings naming
/// no section (client commands, the example) are skipped.
fn documented_keys(section: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut documented: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in section.lines() {
        if let Some(heading) = line.strip_prefix("### ") {
            current = if heading.starts_with("Top level") {
                Some(String::new())
            } else {
                first_code_span(heading)
                    .and_then(|span| span.strip_prefix('['))
                    .and_then(|span| span.strip_suffix(']'))
                    .map(str::to_owned)
            };
            if let Some(name) = &current {
                documented.entry(name.clone()).or_default();
            }
            continue;
        }
        let (Some(name), Some(row)) = (&current, line.strip_prefix('|')) else {
            continue;
        };
        let first_cell = row.split('|').next().unwrap_or_default();
        if let Some(key) = first_code_span(first_cell) {
            documented
                .get_mut(name)
                .expect("section entered")
                .insert(key.to_owned());
        }
    }
    documented
}

/// One `*FileConfig` struct (a serde struct of the configuration file).
#[derive(Debug)]
struct FileStruct {
    /// The struct's name.
    name: String,
    /// Where it is defined, for messages.
    file: String,
    /// Its file section: `""` for `FileConfig` (the top level), otherwise the
    /// `[section]` its doc comment names (`[agents.types.NAME]`).
    section: Option<String>,
    /// Keys that are values (serde renames applied), not sub-sections.
    keys: Vec<String>,
}

/// Every `pub struct *FileConfig` in `src/`, read from the source text: its
/// section (from its doc comment) and its keys (from its fields; a field whose
/// type is another `*FileConfig` is a sub-section, not a key).
fn file_config_structs() -> Vec<FileStruct> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    files_with_extension(&root.join("src"), "rs", &mut files);
    files.sort();
    let mut structs = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for (index, line) in lines.iter().enumerate() {
            let Some(name) = line
                .strip_prefix("pub struct ")
                .and_then(|rest| rest.strip_suffix(" {"))
                .filter(|name| name.ends_with("FileConfig"))
            else {
                continue;
            };
            let mut doc = Vec::new();
            for above in lines[..index].iter().rev() {
                let above = above.trim();
                if let Some(comment) = above.strip_prefix("///") {
                    doc.push(comment);
                } else if !above.starts_with("#[") {
                    break;
                }
            }
            let section = if name == "FileConfig" {
                Some(String::new())
            } else {
                doc.iter().rev().find_map(|comment| {
                    first_code_span(comment)
                        .and_then(|span| span.strip_prefix('['))
                        .and_then(|span| span.strip_suffix(']'))
                        .map(str::to_owned)
                })
            };
            let mut keys = Vec::new();
            let mut rename = None;
            for field in &lines[index + 1..] {
                if *field == "}" {
                    break;
                }
                let field = field.trim();
                if let Some(attribute) = field.strip_prefix("#[serde(") {
                    if let Some((_, rest)) = attribute.split_once("rename = \"") {
                        rename = rest.split('"').next().map(str::to_owned);
                    }
                    continue;
                }
                let Some((field_name, field_type)) = field
                    .strip_prefix("pub ")
                    .and_then(|declaration| declaration.split_once(':'))
                else {
                    continue;
                };
                let renamed = rename.take();
                if field_type.contains("FileConfig") {
                    continue;
                }
                keys.push(renamed.unwrap_or_else(|| field_name.trim().to_owned()));
            }
            structs.push(FileStruct {
                name: name.to_owned(),
                file: path
                    .strip_prefix(root)
                    .unwrap_or(path)
                    .display()
                    .to_string(),
                section,
                keys,
            });
        }
    }
    structs
}

#[test]
fn the_readme_documents_every_configuration_file_key() {
    let readme = readme();
    let documented = documented_keys(configuration_section(&readme));
    let structs = file_config_structs();
    assert!(
        structs.len() >= 11 && structs.iter().any(|found| found.name == "FileConfig"),
        "the walk found the configuration file structs: {structs:?}"
    );
    let mut problems = Vec::new();
    let mut known: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for found in &structs {
        let Some(section) = &found.section else {
            problems.push(format!(
                "{} ({}): its doc comment names no section; start it with \"`[section]` in the file.\"",
                found.name, found.file
            ));
            continue;
        };
        let shown = if section.is_empty() {
            "top level".to_owned()
        } else {
            format!("[{section}]")
        };
        known
            .entry(section)
            .or_default()
            .extend(found.keys.iter().map(String::as_str));
        let Some(rows) = documented.get(section) else {
            problems.push(format!(
                "README.md has no table for {shown} ({}, {}); add a \"### `[{section}]`\" heading and table under ## Configuration",
                found.name, found.file
            ));
            continue;
        };
        for key in &found.keys {
            if !rows.contains(key) {
                problems.push(format!(
                    "README.md's {shown} table has no row for `{key}` ({}.{key} in {})",
                    found.name, found.file
                ));
            }
        }
    }
    for (section, rows) in &documented {
        let code = known.get(section.as_str());
        for key in rows {
            if !code.is_some_and(|keys| keys.contains(key.as_str())) {
                problems.push(format!(
                    "README.md documents `{key}` in [{section}], but no *FileConfig struct has it"
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "the configuration reference in README.md is out of date:\n{}",
        problems.join("\n")
    );
}

/// Every `MOSAIC_*` name in a string literal under `src/`, outside `#[cfg(test)]`
/// modules (inline, or a module's `tests.rs` beside it): clap's `env = "..."`,
/// the `ENV_*` constants clap and `std::env` read, and the variables given to
/// agents.
fn environment_variables_in_sources() -> BTreeMap<String, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    files_with_extension(&root.join("src"), "rs", &mut files);
    let mut found = BTreeMap::new();
    for path in &files {
        if path.file_name().is_some_and(|name| name == "tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let code = text
            .split("\n#[cfg(test)]\nmod tests")
            .next()
            .unwrap_or_default();
        for (start, _) in code.match_indices("\"MOSAIC_") {
            let name: String = code[start + 1..]
                .chars()
                .take_while(|character| {
                    character.is_ascii_uppercase()
                        || character.is_ascii_digit()
                        || *character == '_'
                })
                .collect();
            let where_found = path
                .strip_prefix(root)
                .unwrap_or(path)
                .display()
                .to_string();
            found.entry(name).or_insert(where_found);
        }
    }
    found
}

#[test]
fn the_readme_names_every_mosaic_environment_variable() {
    let readme = readme();
    let variables = environment_variables_in_sources();
    assert!(
        variables.len() >= 25 && variables.contains_key("MOSAIC_RATE_LIMIT_TTL"),
        "the walk found the variables: {variables:?}"
    );
    let missing: Vec<String> = variables
        .iter()
        .filter(|(name, _)| !readme.contains(name.as_str()))
        .map(|(name, file)| format!("{name} (read in {file})"))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md does not mention these environment variables; add them to the configuration reference:\n{}",
        missing.join("\n")
    );
}

/// The fenced block tagged `toml mosaicd-config` in the configuration section.
fn example_configuration(section: &str) -> &str {
    let start = section
        .find("```toml mosaicd-config\n")
        .expect("README.md's configuration section has a ```toml mosaicd-config block");
    let body = &section[start..];
    let body = &body[body.find('\n').expect("fence line ends") + 1..];
    &body[..body.find("\n```").expect("the example block is closed") + 1]
}

#[test]
fn the_readme_example_configuration_loads_and_sets_every_key() {
    use mosaic_mesh::config::{Config, ConfigArgs};
    use mosaic_mesh::ratelimit::{Storage, Tier};
    use mosaic_mesh::tls::ca::TlsSettings;
    use std::time::Duration;

    let readme = readme();
    let example = example_configuration(configuration_section(&readme));
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("mosaicd.toml");
    std::fs::write(&path, example).expect("write the example");
    let args = ConfigArgs {
        config: Some(path),
        ..ConfigArgs::default()
    };
    let config = Config::load(&args).unwrap_or_else(|error| {
        panic!("the README's example configuration does not load: {error}")
    });

    assert_eq!(config.data_dir, Path::new("/var/lib/mosaicd"));
    assert_eq!(config.listen, "0.0.0.0:7443".parse().expect("address"));
    assert!(config.database_url.starts_with("postgres://"));
    assert_eq!(config.instance.name, "mesh-eu-1");
    assert_eq!(config.instance.metadata["region"], "eu-west");
    assert_eq!(config.shutdown_grace, Duration::from_secs(20));
    assert_eq!(config.rotation_grace, Duration::from_secs(172_800));
    assert!(
        matches!(&config.tls, TlsSettings::Ca { cert_chain, .. } if cert_chain == Path::new("/etc/mosaicd/chain.pem")),
        "{:?}",
        config.tls
    );
    assert_eq!(config.agents.max_concurrent, 32);
    assert_eq!(
        config.agents.types["claude"].timeout,
        Duration::from_secs(1800)
    );
    assert_eq!(config.agents.types["sh"].timeout, Duration::from_secs(3600));
    let github = &config.coordinator.webhooks["github"];
    assert_eq!(github.events["push"], "build");
    assert_eq!(github.workspace, "platform");
    assert_eq!(config.federation.ping_interval, Duration::from_secs(30));
    assert_eq!(config.federation.auto_accept_grants, ["agent.status"]);
    assert_eq!(
        config.federation.command_log_retention,
        Duration::from_secs(30 * 24 * 60 * 60)
    );
    assert_eq!(config.rate_limit.storage, Storage::Redis);
    assert_eq!(config.rate_limit.replicas, 3);
    assert_eq!(config.rate_limit.limits.quota(Tier::Webhook).limit, 120);
    assert_eq!(config.rate_limit.redis_timeout, Duration::from_millis(40));

    // The example is complete: every key of every section is set in it (in at
    // least one table of a `NAME` / `SOURCE` section).
    let parsed: toml::Table = example.parse().expect("the example is TOML");
    let mut unset = Vec::new();
    for found in file_config_structs() {
        let Some(section) = found.section else {
            continue;
        };
        let mut tables = vec![&parsed];
        for part in section.split('.').filter(|part| !part.is_empty()) {
            tables = tables
                .into_iter()
                .flat_map(|table| -> Vec<&toml::Table> {
                    if part.chars().all(|character| character.is_ascii_uppercase()) {
                        table.values().filter_map(toml::Value::as_table).collect()
                    } else {
                        table
                            .get(part)
                            .and_then(toml::Value::as_table)
                            .into_iter()
                            .collect()
                    }
                })
                .collect();
        }
        for key in &found.keys {
            if !tables.iter().any(|table| table.contains_key(key)) {
                let shown = if section.is_empty() {
                    "top level".to_owned()
                } else {
                    format!("[{section}]")
                };
                unset.push(format!("{shown} `{key}`"));
            }
        }
    }
    assert!(
        unset.is_empty(),
        "README.md's example configuration does not set:\n{}",
        unset.join("\n")
    );
}
