//! Tidy checks of the layout of `src/`: no two modules import each other,
//! directly or around a circle, so the drawing of the code runs one way; and
//! no file grows far past the few hundred lines a concept takes.
//!
//! A module is a file (`mod.rs` is its folder's module). An import is any
//! path through `crate::`, `super::` or `self::` to another module, in code
//! outside `#[cfg(test)] mod tests` and `tests.rs`. A module may use its
//! ancestors (a child file holds part of its parent's concept) and a parent
//! its children; circles between any other modules fail.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A file past this has taken in a second concept (STYLE.md: split at about
/// 800 lines).
const MAX_LINES: usize = 850;

fn source_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    crate::tidy::files_with_extension(&src, "rs", &mut files);
    assert!(!files.is_empty(), "no Rust files under {}", src.display());
    files.sort();
    files
}

/// `src/federation/commands/send.rs` → `["federation", "commands", "send"]`;
/// `mod.rs` and `lib.rs` name their folder.
fn module_of(file: &Path) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let relative = file.strip_prefix(&root).expect("under src");
    let mut parts: Vec<String> = relative
        .with_extension("")
        .iter()
        .map(|part| part.to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The code of a file without its unit tests and line comments.
fn code_of(file: &Path) -> String {
    let text = std::fs::read_to_string(file).expect("read source");
    let code = text
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or_default();
    code.lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `crate::a::b…`, `super::…` or `self::…` path in `code`, as segments
/// after its first word, with that word.
fn paths_in(code: &str) -> Vec<(&str, Vec<&str>)> {
    let mut paths = Vec::new();
    let bytes = code.as_bytes();
    for start in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(found) = code[from..].find(start) {
            let at = from + found;
            from = at + start.len();
            let preceded =
                at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
            if preceded {
                continue;
            }
            let rest = &code[from..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            let segments = rest[..end]
                .split("::")
                .filter(|segment| !segment.is_empty())
                .collect();
            paths.push((&start[..start.len() - 2], segments));
        }
    }
    paths
}

type Graph = BTreeMap<Vec<String>, BTreeSet<Vec<String>>>;

fn import_graph() -> Graph {
    let files = source_files();
    let modules: BTreeSet<Vec<String>> = files.iter().map(|file| module_of(file)).collect();
    let mut graph = Graph::new();
    for file in files.iter().filter(|file| !file.ends_with("tests.rs")) {
        let module = module_of(file);
        for (kind, segments) in paths_in(&code_of(file)) {
            let mut base: Vec<String> = match kind {
                "crate" => Vec::new(),
                "self" => module.clone(),
                _ => module[..module.len().saturating_sub(1)].to_vec(),
            };
            let mut segments = segments.as_slice();
            while let Some((&"super", rest)) = segments.split_first() {
                base.pop();
                segments = rest;
            }
            base.extend(segments.iter().map(|segment| (*segment).to_owned()));
            // The longest prefix that is a module is what the path reaches.
            let Some(target) = (1..=base.len())
                .rev()
                .map(|length| base[..length].to_vec())
                .find(|prefix| modules.contains(prefix))
            else {
                continue;
            };
            let related = target.starts_with(&module) || module.starts_with(&target);
            if !related {
                graph.entry(module.clone()).or_default().insert(target);
            }
        }
    }
    graph
}

/// The strongly connected groups of more than one module (Tarjan).
fn circles(graph: &Graph) -> Vec<Vec<Vec<String>>> {
    struct State<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a Vec<String>, usize>,
        low: BTreeMap<&'a Vec<String>, usize>,
        stack: Vec<&'a Vec<String>>,
        found: Vec<Vec<Vec<String>>>,
    }
    fn visit<'a>(state: &mut State<'a>, node: &'a Vec<String>) {
        let number = state.index.len();
        state.index.insert(node, number);
        state.low.insert(node, number);
        state.stack.push(node);
        for next in state.graph.get(node).into_iter().flatten() {
            if !state.index.contains_key(next) {
                visit(state, next);
                let low = state.low[node].min(state.low[next]);
                state.low.insert(node, low);
            } else if state.stack.contains(&next) {
                let low = state.low[node].min(state.index[next]);
                state.low.insert(node, low);
            }
        }
        if state.low[node] == state.index[node] {
            let mut group = Vec::new();
            while let Some(member) = state.stack.pop() {
                group.push(member.clone());
                if member == node {
                    break;
                }
            }
            if group.len() > 1 {
                state.found.push(group);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        found: Vec::new(),
    };
    let nodes: BTreeSet<&Vec<String>> = graph.keys().chain(graph.values().flatten()).collect();
    for node in nodes {
        if !state.index.contains_key(node) {
            visit(&mut state, node);
        }
    }
    state.found
}

#[test]
fn no_two_modules_of_src_import_each_other_even_around_a_circle() {
    let graph = import_graph();
    // The check sees the imports it must: the server builds the services.
    let server = vec!["server".to_owned()];
    let federation_service = vec!["federation".to_owned(), "service".to_owned()];
    assert!(
        graph
            .get(&server)
            .is_some_and(|targets| targets.contains(&federation_service)),
        "the import graph misses server -> federation::service"
    );
    let found: Vec<String> = circles(&graph)
        .iter()
        .map(|group| {
            let names: Vec<String> = group.iter().map(|module| module.join("::")).collect();
            names.join(" <-> ")
        })
        .collect();
    assert!(found.is_empty(), "import circles in src/: {found:#?}");
}

#[test]
fn a_circle_of_two_modules_is_found() {
    let module = |name: &str| vec![name.to_owned()];
    let mut graph = Graph::new();
    graph.entry(module("a")).or_default().insert(module("b"));
    graph.entry(module("b")).or_default().insert(module("c"));
    graph.entry(module("c")).or_default().insert(module("b"));
    let found = circles(&graph);
    assert_eq!(found.len(), 1, "{found:?}");
    let mut members = found[0].clone();
    members.sort();
    assert_eq!(members, vec![module("b"), module("c")]);
}

#[test]
fn no_file_of_src_is_far_past_a_few_hundred_lines() {
    let long: Vec<String> = source_files()
        .iter()
        .filter_map(|file| {
            let lines = std::fs::read_to_string(file).ok()?.lines().count();
            (lines > MAX_LINES).then(|| format!("{} ({lines} lines)", file.display()))
        })
        .collect();
    assert!(
        long.is_empty(),
        "past {MAX_LINES} lines, split by concept: {long:?}"
    );
}
