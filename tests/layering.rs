//! The layering of `docs/architecture.md` ("Dependencies"), checked on the
//! imports: every `crate::<module>` path in `src/` (outside comments, string
//! and character literals) is an edge from the file's top-level module to
//! `<module>`. Each edge must point down [`LAYERS`] (so the graph has no
//! cycle), `config`, `protocol` and `net` import nothing else of the crate,
//! and the router names no I/O.
//!
//! A new top-level module must be given its place in [`LAYERS`] (and in the
//! document) before this test passes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The top-level modules in layers, from the top of the data path down. A
/// module may import the modules of the layers below its own, never its own
/// layer's or those above. Keep in step with `docs/architecture.md`.
const LAYERS: &[&[&str]] = &[
    // `pgpilot demo`: a local cluster with a proxy in front; the fuzz targets.
    &["demo", "fuzzing"],
    // The listener.
    &["server"],
    // One task per client.
    &["session"],
    // Commands pgpilot answers itself, on the side of the session.
    &["admin"],
    // The state every task shares (and the registries sessions write).
    &["context"],
    // Counters bumped on the hot path, gauges read at scrape time.
    &["metrics"],
    // Which node, who may log in, read-your-writes, failures as SQLSTATEs.
    &["router", "auth", "consistency", "error"],
    // Connections to the nodes.
    &["backend"],
    // The one owner of node state.
    &["cluster"],
    // Leaves: import nothing else of the crate.
    &["config", "protocol", "net", "localcluster"],
];

/// Modules that must stay leaves: they import nothing else of the crate.
const LEAVES: &[&str] = &["config", "protocol", "net"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `text` with comments and the contents of string and character literals
/// blanked, so only code is searched.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if rest.starts_with(b"/*") {
            // Block comments nest in Rust.
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(b' ');
        } else if let Some(hashes) = raw_string_start(rest) {
            // r"…", r#"…"#, br#"…"#: ends at a quote followed by as many hashes.
            i += rest
                .iter()
                .position(|&c| c == b'"')
                .expect("raw string quote")
                + 1;
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            while i < b.len() && !b[i..].starts_with(&close) {
                i += 1;
            }
            i += close.len();
            out.extend_from_slice(b"\"\"");
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.extend_from_slice(b"\"\"");
        } else if b[i] == b'\'' && char_literal_len(rest).is_some() {
            i += char_literal_len(rest).unwrap_or(1);
            out.extend_from_slice(b"' '");
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The number of `#` of a raw string literal starting at `s`, if one does.
fn raw_string_start(s: &[u8]) -> Option<usize> {
    let s = s.strip_prefix(b"b").unwrap_or(s);
    let s = s.strip_prefix(b"r")?;
    let hashes = s.iter().take_while(|&&c| c == b'#').count();
    (s.get(hashes) == Some(&b'"')).then_some(hashes)
}

/// The length of a character literal starting at `s` (`'a'`, `'\n'`,
/// `'\u{1F600}'`), or `None` for a lifetime.
fn char_literal_len(s: &[u8]) -> Option<usize> {
    if s.get(1) == Some(&b'\\') {
        // The escaped character (maybe a quote) is s[2]; the literal ends at
        // the next quote after it.
        return s.get(3..)?.iter().position(|&c| c == b'\'').map(|p| p + 4);
    }
    let text = std::str::from_utf8(&s[1..s.len().min(6)])
        .ok()
        .or_else(|| {
            // A multi-byte character may be cut at the window's end.
            (2..=5)
                .rev()
                .find_map(|n| std::str::from_utf8(&s[1..s.len().min(n)]).ok())
        })?;
    let c = text.chars().next()?;
    let after = 1 + c.len_utf8();
    (s.get(after) == Some(&b'\'')).then_some(after + 1)
}

/// The top-level module each `crate::<name>` path in `code` names.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        let after = &rest[at + "crate::".len()..];
        // `crate::x` and `$crate::x`, not `my_crate::x`.
        if !before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            let name: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
        rest = after;
    }
    found
}

/// Edges between top-level modules: (from, to) → the files that make them.
fn import_graph() -> BTreeMap<(String, String), Vec<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut edges: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src/");
        let first = rel.components().next().expect("a path");
        let top = first.as_os_str().to_string_lossy();
        let top = top.strip_suffix(".rs").unwrap_or(&top).to_string();
        // The crate root and the binary name every module; they are not layers.
        if top == "lib" || top == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read a source file");
        for to in crate_paths(&code_only(&text)) {
            if to != top {
                edges
                    .entry((top.clone(), to))
                    .or_default()
                    .push(rel.display().to_string());
            }
        }
    }
    edges
}

/// A cycle in `edges`, if there is one.
fn find_cycle(edges: &BTreeSet<(String, String)>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeSet<(String, String)>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for (_, to) in edges.iter().filter(|(from, _)| from == node) {
            if let Some(c) = visit(to, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for (from, _) in edges {
        if let Some(c) = visit(from, edges, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

/// Each module's layer, 0 at the top.
fn layer_of() -> BTreeMap<&'static str, usize> {
    LAYERS
        .iter()
        .enumerate()
        .flat_map(|(i, layer)| layer.iter().map(move |m| (*m, i)))
        .collect()
}

#[test]
fn imports_follow_the_documented_layers() {
    let graph = import_graph();
    let layer = layer_of();
    let mut wrong = Vec::new();
    for ((from, to), files) in &graph {
        match (layer.get(from.as_str()), layer.get(to.as_str())) {
            (Some(f), Some(t)) if t > f => {}
            (Some(_), Some(_)) => {
                wrong.push(format!("{from} -> {to} points up or sideways: {files:?}"))
            }
            _ => wrong.push(format!(
                "{from} -> {to}: a module with no place in LAYERS: {files:?}"
            )),
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layering:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_cycles_between_top_level_modules() {
    let edges: BTreeSet<(String, String)> = import_graph().into_keys().collect();
    assert_eq!(
        find_cycle(&edges),
        None,
        "a cycle between top-level modules"
    );
}

#[test]
fn leaves_import_nothing_of_the_crate() {
    let graph = import_graph();
    let bad: Vec<String> = graph
        .iter()
        .filter(|((from, _), _)| LEAVES.contains(&from.as_str()))
        .map(|((from, to), files)| format!("{from} -> {to}: {files:?}"))
        .collect();
    assert!(bad.is_empty(), "leaves with imports:\n{}", bad.join("\n"));
}

/// The router is pure (`src/router/mod.rs`): it names no client library,
/// socket or task; lookups it needs go through a trait implemented where
/// connections live.
#[test]
fn the_router_does_no_io() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/router");
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    let mut bad = Vec::new();
    for file in files {
        let code = code_only(&std::fs::read_to_string(&file).expect("read a source file"));
        for io in [
            "tokio_postgres",
            "tokio::net",
            "tokio::spawn",
            "std::net",
            "std::fs",
        ] {
            if code.contains(io) {
                bad.push(format!("{}: {io}", file.display()));
            }
        }
    }
    assert!(bad.is_empty(), "I/O in the router:\n{}", bad.join("\n"));
}

#[test]
fn every_module_has_a_place() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let placed = layer_of();
    for entry in std::fs::read_dir(&src).expect("read src/") {
        let name = entry.expect("dir entry").file_name();
        let name = name.to_string_lossy();
        let module = name.strip_suffix(".rs").unwrap_or(&name);
        if module != "lib" && module != "main" {
            assert!(
                placed.contains_key(module),
                "{module} has no place in LAYERS"
            );
        }
    }
}

#[test]
fn the_scanner_sees_code_only() {
    let code = code_only(
        "use crate::a::X; // crate::b\n/* crate::c /* nested */ crate::d */\n\
         let s = \"crate::e\"; let r = r#\"crate::f\"#; let c = '\"'; let q = '\\''; let d = \"crate::k\"; fn g<'a>() {}\n\
         $crate::h::y(); other_crate::i::z(); crate::j",
    );
    let found: Vec<String> = crate_paths(&code).into_iter().collect();
    assert_eq!(found, ["a", "h", "j"]);
}
