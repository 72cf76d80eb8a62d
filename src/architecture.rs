//! The architecture test: the layer table in `src/lib.rs` is a rule, not a wish.
//!
//! In the spirit of rust-analyzer's tidy tests, this reads every file under `src/` and fails,
//! naming file and line, when a module names one above it in the table, when the top-level
//! modules import each other round a circle (even within one layer), when a top-level module
//! is missing from the table, or when `iroh::` appears outside `src/transport/` (iroh's API
//! changes between releases; one module absorbs that).
//!
//! What counts as "naming" a module: a `crate::x` path (in a `use` tree or inline) and a
//! `super::` path that climbs to the crate root. Comments, string literals and
//! `#[cfg(test)]` modules are left out: tests may reach anywhere to set things up.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One module's place in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layer {
    level: u32,
}

/// A reference from one file to another top-level module.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reference {
    file: PathBuf,
    line: usize,
    from: String,
    to: String,
}

/// The table written in `src/lib.rs`: lines `//! | L<n> | `a`, `b` | … |`.
fn layer_table(lib_rs: &str) -> BTreeMap<String, Layer> {
    let mut table = BTreeMap::new();
    for line in lib_rs.lines() {
        let Some(rest) = line.trim_start().strip_prefix("//! | L") else {
            continue;
        };
        let mut cells = rest.split('|');
        let Some(level) = cells.next().and_then(|c| c.trim().parse::<u32>().ok()) else {
            continue;
        };
        let Some(modules) = cells.next() else {
            continue;
        };
        for name in modules.split('`').skip(1).step_by(2) {
            table.insert(name.to_string(), Layer { level });
        }
    }
    table
}

/// The top-level modules `lib.rs` declares (`pub mod x;` / `mod x;`, tests left out).
fn declared_modules(lib_rs: &str) -> Vec<String> {
    let code = strip_tests(&strip_comments_and_strings(lib_rs));
    code.lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("pub ").unwrap_or(l);
            let name = l.strip_prefix("mod ")?.strip_suffix(';')?;
            Some(name.trim().to_string())
        })
        .collect()
}

/// Blank out comments and string/char literals, keeping line breaks (so line numbers stay
/// right) and everything else byte for byte.
fn strip_comments_and_strings(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let blank = |c: u8| if c == b'\n' { b'\n' } else { b' ' };
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
        } else if c == b'r' && matches!(b.get(i + 1), Some(b'"') | Some(b'#')) && !ident(b, i) {
            // Raw string r"…" / r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            while j < b.len() && !b[j..].starts_with(&close) {
                j += 1;
            }
            let end = (j + close.len()).min(b.len());
            out.extend(b[i..end].iter().map(|&c| blank(c)));
            i = end;
        } else if c == b'"' {
            out.push(b' ');
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    out.push(b' ');
                    i += 1;
                }
                if i < b.len() {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
            out.push(b' ');
            i += 1;
        } else if c == b'\'' {
            // A char literal ('a', '\n', '\u{..}') — not a lifetime ('a without a closing ').
            let rest = &b[i + 1..];
            let len = if rest.first() == Some(&b'\\') {
                rest.iter().position(|&c| c == b'\'').map(|p| p + 1)
            } else if rest.get(1) == Some(&b'\'') {
                Some(2)
            } else {
                None
            };
            match len {
                Some(n) => {
                    out.extend(std::iter::repeat_n(b' ', n + 1));
                    i += n + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Whether the byte before `i` continues an identifier (so `r"` is not a raw string).
fn ident(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
}

/// Blank out `#[cfg(test)]` items (a `mod … { … }` block or a `mod …;` line), keeping lines.
fn strip_tests(code: &str) -> String {
    let mut out = code.as_bytes().to_vec();
    let mut from = 0;
    while let Some(at) = code[from..].find("#[cfg(test)]") {
        let start = from + at;
        let b = code.as_bytes();
        let mut i = start + "#[cfg(test)]".len();
        // The item ends at the `;` before any `{`, or at the `}` matching the first `{`.
        let mut depth = 0usize;
        while i < b.len() {
            match b[i] {
                b';' if depth == 0 => {
                    i += 1;
                    break;
                }
                b'{' => depth += 1,
                b'}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        i += 1;
                        break;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        for c in &mut out[start..i.min(b.len())] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
        from = i.min(code.len());
    }
    String::from_utf8(out).unwrap_or_default()
}

/// The module path of a file under `src/` (`agent/pool.rs` → `["agent", "pool"]`).
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// Every top-level module `code` (the text of the file at `rel`) names, with its line.
fn references(rel: &Path, code: &str, modules: &BTreeSet<String>) -> Vec<Reference> {
    let path = module_path(rel);
    let Some(from) = path.first().cloned() else {
        return vec![];
    };
    let mut out = vec![];
    let line_of = |pos: usize| code[..pos].matches('\n').count() + 1;
    let mut push = |pos: usize, name: &str| {
        if modules.contains(name) && name != from {
            out.push(Reference {
                file: rel.to_path_buf(),
                line: line_of(pos),
                from: from.clone(),
                to: name.to_string(),
            });
        }
    };
    let b = code.as_bytes();
    let mut i = 0;
    while let Some(at) = code[i..].find("crate::") {
        let pos = i + at;
        i = pos + "crate::".len();
        if pos > 0 && (b[pos - 1].is_ascii_alphanumeric() || b[pos - 1] == b'_') {
            continue; // `$crate::`, `mycrate::`
        }
        let rest = code[i..].trim_start();
        if let Some(tree) = rest.strip_prefix('{') {
            for name in tree_heads(tree) {
                push(pos, &name);
            }
        } else {
            push(pos, &leading_ident(rest));
        }
    }
    // `super::` chains that climb to the crate root (depth = module path length).
    let mut i = 0;
    while let Some(at) = code[i..].find("super::") {
        let pos = i + at;
        if pos > 0
            && (b[pos - 1].is_ascii_alphanumeric() || b[pos - 1] == b'_' || b[pos - 1] == b':')
        {
            i = pos + 7;
            continue;
        }
        let mut j = pos;
        let mut ups = 0;
        while code[j..].starts_with("super::") {
            ups += 1;
            j += 7;
        }
        i = j;
        if ups >= path.len() {
            let rest = &code[j..];
            if let Some(tree) = rest.strip_prefix('{') {
                for name in tree_heads(tree) {
                    push(pos, &name);
                }
            } else {
                push(pos, &leading_ident(rest));
            }
        }
    }
    out
}

fn leading_ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// The first segment of each entry of a use tree `a::b, c::{d, e}, f}` (after its `{`).
fn tree_heads(tree: &str) -> Vec<String> {
    let mut heads = vec![];
    let mut depth = 0usize;
    let mut at_entry = true;
    let mut chars = tree.char_indices().peekable();
    while let Some((k, c)) = chars.next() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => at_entry = true,
            c if at_entry && (c.is_ascii_alphabetic() || c == '_') => {
                heads.push(leading_ident(&tree[k..]));
                at_entry = false;
            }
            _ => {}
        }
        let _ = chars.peek();
    }
    heads
}

/// Lines of `code` that use iroh's API (`iroh::`), outside the transport module.
fn iroh_uses(rel: &Path, code: &str) -> Vec<usize> {
    if rel.starts_with("transport") {
        return vec![];
    }
    let b = code.as_bytes();
    code.match_indices("iroh::")
        .filter(|(p, _)| {
            // `iroh::x`, not `transport::iroh::x` (our own module of that name).
            *p == 0 || !(b[p - 1].is_ascii_alphanumeric() || b[p - 1] == b'_' || b[p - 1] == b':')
        })
        .map(|(p, _)| code[..p].matches('\n').count() + 1)
        .collect()
}

/// All the problems of a source tree given as (path under src/, text) pairs.
fn check(lib_rs: &str, files: &[(PathBuf, String)]) -> Vec<String> {
    let table = layer_table(lib_rs);
    let mut problems = vec![];
    let declared = declared_modules(lib_rs);
    for m in &declared {
        if !table.contains_key(m) {
            problems.push(format!(
                "src/lib.rs: module `{m}` is not in the layer table"
            ));
        }
    }
    let modules: BTreeSet<String> = declared.into_iter().collect();
    let test_only = test_only_modules(files);
    let mut edges: BTreeMap<(String, String), Reference> = BTreeMap::new();
    for (rel, text) in files {
        if rel == Path::new("lib.rs") || rel == Path::new("main.rs") {
            continue;
        }
        let path = module_path(rel);
        if test_only.iter().any(|t| path.starts_with(t)) {
            continue;
        }
        let code = strip_tests(&strip_comments_and_strings(text));
        for line in iroh_uses(rel, &code) {
            problems.push(format!(
                "src/{}:{line}: names iroh outside src/transport/",
                rel.display()
            ));
        }
        for r in references(rel, &code, &modules) {
            let (Some(from), Some(to)) = (table.get(&r.from), table.get(&r.to)) else {
                continue;
            };
            if to.level > from.level {
                problems.push(format!(
                    "src/{}:{}: `{}` (L{}) names `{}` (L{}), a higher layer",
                    r.file.display(),
                    r.line,
                    r.from,
                    from.level,
                    r.to,
                    to.level
                ));
            }
            edges.entry((r.from.clone(), r.to.clone())).or_insert(r);
        }
    }
    problems.extend(cycles(&edges));
    problems
}

/// Module paths declared `#[cfg(test)] mod x;` (files that are tests as a whole).
fn test_only_modules(files: &[(PathBuf, String)]) -> Vec<Vec<String>> {
    let mut out = vec![];
    for (rel, text) in files {
        let code = strip_comments_and_strings(text);
        let mut rest = code.as_str();
        while let Some(at) = rest.find("#[cfg(test)]") {
            rest = &rest[at + "#[cfg(test)]".len()..];
            let item = rest.trim_start();
            let item = item.strip_prefix("pub ").unwrap_or(item);
            if let Some(decl) = item.strip_prefix("mod ") {
                let name = leading_ident(decl.trim_start());
                if decl.trim_start()[name.len()..]
                    .trim_start()
                    .starts_with(';')
                {
                    let mut path = if rel == Path::new("lib.rs") {
                        vec![]
                    } else {
                        module_path(rel)
                    };
                    path.push(name);
                    out.push(path);
                }
            }
        }
    }
    out
}

/// Every circle among top-level modules, each named with one file:line per edge.
fn cycles(edges: &BTreeMap<(String, String), Reference>) -> Vec<String> {
    let mut graph: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        graph.entry(from).or_default().push(to);
    }
    let mut found = BTreeSet::new();
    let mut out = vec![];
    for &start in graph.keys() {
        // Depth-first search for a path back to `start`.
        let mut stack: Vec<(&str, usize)> = vec![(start, 0)];
        let mut seen = BTreeSet::new();
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            let succ = graph.get(node).map(Vec::as_slice).unwrap_or(&[]);
            if *next >= succ.len() {
                stack.pop();
                continue;
            }
            let s = succ[*next];
            *next += 1;
            if s == start {
                let names: Vec<&str> = stack.iter().map(|(n, _)| *n).collect();
                let mut key: Vec<&str> = names.clone();
                key.sort();
                if found.insert(key) {
                    let mut steps = vec![];
                    for (k, from) in names.iter().enumerate() {
                        let to = names.get(k + 1).copied().unwrap_or(start);
                        let r = &edges[&(from.to_string(), to.to_string())];
                        steps.push(format!(
                            "{from} → {to} (src/{}:{})",
                            r.file.display(),
                            r.line
                        ));
                    }
                    out.push(format!("import circle: {}", steps.join(", ")));
                }
            } else if seen.insert(s) {
                stack.push((s, 0));
            }
        }
    }
    out
}

fn read_tree(src: &Path) -> Vec<(PathBuf, String)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, String)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(root, &p, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let rel = p.strip_prefix(root).unwrap_or(&p).to_path_buf();
                out.push((rel, text));
            }
        }
    }
    let mut out = vec![];
    walk(src, src, &mut out);
    out
}

#[test]
fn the_layer_table_holds() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib_rs = std::fs::read_to_string(src.join("lib.rs")).expect("src/lib.rs");
    assert!(
        layer_table(&lib_rs).len() >= 10,
        "src/lib.rs has no layer table (lines `//! | L0 | `id52`, … |`)"
    );
    let problems = check(&lib_rs, &read_tree(&src));
    assert!(
        problems.is_empty(),
        "{} architecture problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIB: &str = "//! | L0 | `low` | x |\n//! | L1 | `mid`, `mid2` | y |\n//! | L2 | `top` | z |\npub mod low;\npub mod mid;\npub mod mid2;\npub mod top;\n";

    fn run(files: &[(&str, &str)]) -> Vec<String> {
        let files: Vec<(PathBuf, String)> = files
            .iter()
            .map(|(p, t)| (PathBuf::from(p), t.to_string()))
            .collect();
        check(LIB, &files)
    }

    #[test]
    fn downward_names_pass() {
        let p = run(&[
            (
                "mid.rs",
                "use crate::low::X;\nfn f() { crate::low::y(); }\n",
            ),
            (
                "top/mod.rs",
                "use crate::{mid::A, low::{B, C}};\nuse super::Z;\n",
            ),
            ("top/deep.rs", "use super::super::mid;\n"),
        ]);
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn an_upward_name_is_reported_with_file_and_line() {
        let p = run(&[("low.rs", "\n\nfn f() { crate::top::go(); }\n")]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("src/low.rs:3:"), "{p:?}");
        let p = run(&[("low/x.rs", "use crate::{\n  mid::{A, B},\n};\n")]);
        assert!(p[0].contains("`low` (L0) names `mid` (L1)"), "{p:?}");
        // super:: climbing to the root counts too.
        let p = run(&[("low/x.rs", "use super::super::top::T;\n")]);
        assert_eq!(p.len(), 1, "{p:?}");
    }

    #[test]
    fn comments_strings_and_tests_do_not_count() {
        let p = run(&[(
            "low.rs",
            "// crate::top\n/* crate::top */\nconst S: &str = \"crate::top\";\nconst R: &str = r#\"crate::top\"#;\nfn c() -> char { '\"' }\n#[cfg(test)]\nmod tests { use crate::top::X; }\n",
        )]);
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn a_circle_within_one_layer_is_reported() {
        let p = run(&[
            ("mid.rs", "use crate::mid2::A;\n"),
            ("mid2.rs", "use crate::mid::B;\n"),
        ]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("import circle: mid → mid2 (src/mid.rs:1)"),
            "{p:?}"
        );
    }

    #[test]
    fn iroh_outside_transport_and_unlisted_modules_are_reported() {
        let p = run(&[
            ("low.rs", "fn f(e: iroh::Endpoint) {}\n"),
            ("transport/x.rs", "use iroh::A;\n"),
        ]);
        assert_eq!(
            p,
            vec!["src/low.rs:1: names iroh outside src/transport/".to_string()]
        );
        let lib = format!("{LIB}pub mod stray;\n");
        assert_eq!(check(&lib, &[]).len(), 1);
    }
}
