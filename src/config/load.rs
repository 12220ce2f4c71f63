//! Reading resources from files and directories.
//!
//! Accepts multi-document YAML, `kind: List` wrappers, and directories (every `.yaml`, `.yml`
//! and `.json` file below, skipping dot-entries so a Kubernetes ConfigMap mount's `..data`
//! indirection is not read twice). Kinds veer does not route on (Deployments, ConfigMaps …)
//! are skipped with a debug log, so a whole application manifest can be given as is.
//!
//! Limits, so a broken or hostile file gives an error instead of a hang, a panic or unbounded
//! memory (each is exercised by a test below):
//! - A file (or standard input) larger than [`MAX_FILE_BYTES`] is refused before parsing; the
//!   read itself stops one byte past the limit, so `/dev/zero` or a growing pipe cannot
//!   exhaust memory.
//! - Text must be UTF-8; binary garbage fails with the offset of the first bad byte.
//! - serde_yaml stops at 128 levels of nesting ("recursion limit exceeded") and caps alias
//!   expansion ("repetition limit exceeded"), so a billion-laughs document fails in
//!   milliseconds. The error names the line and column.
//! - Positions for errors are found by a second, alias-free pass ([`super::locate`]) that runs
//!   only when there is something to report.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

use super::locate::{self, Position, Query};
use super::model::*;

/// Largest config file read. Istio configs are kilobytes; a bigger file is almost surely a
/// mistake, and reading it whole would let one bad mount exhaust the sidecar's memory.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Istio API versions that share the networking schema veer reads.
const ISTIO_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1alpha3",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1",
];

/// The whole text of a file, shared by all resources read from it, so an error found after
/// loading (by validation) can still be given a line number.
#[derive(Clone)]
pub struct SourceText(pub Arc<str>);

impl fmt::Debug for SourceText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SourceText({} bytes)", self.0.len())
    }
}

/// Always equal: the text only serves messages. Two loads of a file that differ in comments
/// or layout hold the same resources, and the proxy keeps its running snapshot for them.
impl PartialEq for SourceText {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for SourceText {}

/// Where a resource came from: the file and the 1-based document number within it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Source {
    pub file: PathBuf,
    pub document: usize,
    /// Position inside a `kind: List` (`items[3]`), if the resource came from one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub list_item: Option<usize>,
    /// The file's text, for locating fields; absent for resources built in code.
    #[serde(skip)]
    pub text: Option<SourceText>,
}

impl Source {
    /// The path of `field` from the document root (a List item's fields sit under `items[N]`).
    pub fn document_path(&self, field: &str) -> String {
        match (self.list_item, field.is_empty()) {
            (Some(i), true) => format!("items[{i}]"),
            (Some(i), false) => format!("items[{i}].{field}"),
            (None, _) => field.to_string(),
        }
    }

    /// Where `field` is written, if the text is at hand. Parses the file: call it for errors
    /// only, or use [`locate::locate_all`] for many.
    pub fn locate(&self, field: &str) -> Option<Position> {
        let text = self.text.as_ref()?;
        locate::locate(&text.0, self.document, &self.document_path(field))
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.file.display(), self.document)?;
        if let Some(i) = self.list_item {
            write!(f, " items[{i}]")?;
        }
        Ok(())
    }
}

/// One resource and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Loaded {
    pub source: Source,
    pub resource: Resource,
}

/// Everything loaded from the configured paths, in file order then document order.
///
/// Resources are shared (`Arc`): a reload takes those of unchanged files from the running
/// config instead of copying them (at 10 000 services the copy cost as much as the compile),
/// and comparing two configs skips the resources they share.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConfigSet {
    pub files: Vec<PathBuf>,
    pub resources: Vec<Arc<Loaded>>,
}

impl ConfigSet {
    /// A config of freshly parsed resources.
    pub fn new(files: Vec<PathBuf>, resources: Vec<Loaded>) -> Self {
        let mut set = ConfigSet {
            files,
            resources: Vec::new(),
        };
        set.add_parsed(resources);
        set
    }

    /// Appends freshly parsed resources.
    pub fn add_parsed(&mut self, resources: Vec<Loaded>) {
        self.resources.extend(resources.into_iter().map(Arc::new));
    }
}

impl PartialEq for ConfigSet {
    fn eq(&self, other: &Self) -> bool {
        self.files == other.files
            && self.resources.len() == other.resources.len()
            && self
                .resources
                .iter()
                .zip(&other.resources)
                .all(|(a, b)| Arc::ptr_eq(a, b) || a == b)
    }
}

/// A problem with the user's config, precise enough to fix without guessing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}: file is {size} bytes, larger than the {limit}-byte limit for config files")]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("{path}: no .yaml, .yml or .json files found")]
    Empty { path: PathBuf },
    #[error("{}: document {document}: invalid YAML: {reason}", Located(file, *line, *column))]
    Yaml {
        file: PathBuf,
        document: usize,
        line: Option<usize>,
        column: Option<usize>,
        reason: String,
    },
    /// A resource whose fields are wrong.
    #[error(transparent)]
    Field(Box<FieldError>),
}

/// `file:LINE:COL`, as compilers and editors write positions; parts not known are left out.
pub(crate) struct Located<'a>(pub &'a Path, pub Option<usize>, pub Option<usize>);

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.display())?;
        if let Some(line) = self.1 {
            write!(f, ":{line}")?;
            if let Some(col) = self.2 {
                write!(f, ":{col}")?;
            }
        }
        Ok(())
    }
}

/// A wrong field of one resource. `field` is a path like `spec.tcp[0].route[1].weight`.
/// Printed as `file:LINE:COL: document N (Kind ns/name): field `path`: reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct FieldError {
    pub file: PathBuf,
    /// 1-based document number within the file.
    pub document: usize,
    /// Position inside a `kind: List`, if the resource came from one.
    pub list_item: Option<usize>,
    /// 1-based line and column of the field (or its nearest written ancestor), when known.
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub field: String,
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_resource_message(
            f,
            &ResourceAt {
                file: &self.file,
                document: self.document,
                list_item: self.list_item,
                line: self.line,
                column: self.column,
                kind: &self.kind,
                namespace: &self.namespace,
                name: &self.name,
            },
            &self.field,
            &self.reason,
        )
    }
}

/// The parts of a message about one resource (shared by errors and warnings).
pub(crate) struct ResourceAt<'a> {
    pub file: &'a Path,
    pub document: usize,
    pub list_item: Option<usize>,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub kind: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
}

pub(crate) fn write_resource_message(
    f: &mut fmt::Formatter<'_>,
    at: &ResourceAt<'_>,
    field: &str,
    message: &str,
) -> fmt::Result {
    write!(
        f,
        "{}: document {}",
        Located(at.file, at.line, at.column),
        at.document
    )?;
    if let Some(i) = at.list_item {
        write!(f, " items[{i}]")?;
    }
    write!(f, " ({} {}/{})", at.kind, at.namespace, at.name)?;
    if !field.is_empty() {
        write!(f, ": field `{field}`")?;
    }
    write!(f, ": {message}")
}

impl FieldError {
    /// An error about `field` of the resource at `source`, without a position yet.
    pub(crate) fn unlocated(
        source: &Source,
        kind: &str,
        namespace: &str,
        name: &str,
        field: String,
        reason: String,
    ) -> Self {
        FieldError {
            file: source.file.clone(),
            document: source.document,
            list_item: source.list_item,
            line: None,
            column: None,
            kind: kind.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
            field,
            reason,
        }
    }

    fn set_position(&mut self, pos: Option<Position>) {
        if let Some(p) = pos {
            self.line = Some(p.line);
            self.column = Some(p.column);
        }
    }
}

impl ConfigError {
    /// An error about one field of one loaded resource (used by semantic checks after parsing).
    /// Locates the field in the file's text when it is at hand.
    pub fn field(loaded: &Loaded, field: impl Into<String>, reason: impl Into<String>) -> Self {
        let meta = loaded.resource.metadata();
        let field = field.into();
        let mut e = FieldError::unlocated(
            &loaded.source,
            loaded.resource.kind(),
            meta.namespace(),
            &meta.name,
            field,
            reason.into(),
        );
        e.set_position(loaded.source.locate(&e.field));
        ConfigError::Field(Box::new(e))
    }
}

/// All problems found, so a user fixes them in one pass rather than one per restart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

/// Loads every path (file or directory). Fails with every error found; never partially.
pub fn load_paths(paths: &[PathBuf]) -> Result<ConfigSet, ConfigErrors> {
    let (set, errors) = load_all(paths);
    if errors.is_empty() {
        Ok(set)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Loads what can be loaded and returns it with every error, for tools (`veer validate`) that
/// report on the rest of the config even when some files are broken.
pub fn load_all(paths: &[PathBuf]) -> (ConfigSet, Vec<ConfigError>) {
    let (set, errors, _) = load_all_reusing(paths, None);
    (set, errors)
}

/// A reload's load: like [`load_paths`], but a file whose text is byte for byte what it was
/// when `previous` was loaded is not parsed again; its resources are shared with `previous`
/// (parsing is a function of the text alone). Parsing is most of a reload's time (10 000
/// services: ~2.5 s of YAML against ~0.3 s of compile), and a reload usually follows an edit
/// of one file among many. Also says whether every file was unchanged, so the caller can skip
/// compiling altogether.
pub fn load_paths_reusing(
    paths: &[PathBuf],
    previous: &ConfigSet,
) -> Result<(ConfigSet, Unchanged), ConfigErrors> {
    let (set, errors, unchanged) = load_all_reusing(paths, Some(previous));
    if errors.is_empty() {
        Ok((set, unchanged))
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Whether a [`load_paths_reusing`] found the same files with the same text as before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unchanged(pub bool);

fn load_all_reusing(
    paths: &[PathBuf],
    previous: Option<&ConfigSet>,
) -> (ConfigSet, Vec<ConfigError>, Unchanged) {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        if let Err(e) = collect_files(path, &mut files) {
            errors.push(e);
        }
    }
    // The previous resources by file, with the text they were parsed from (every resource
    // of a file shares that text). A file that produced no resources has no entry and is
    // simply parsed again.
    let mut before: HashMap<&Path, (&Arc<str>, Vec<&Arc<Loaded>>)> = HashMap::new();
    for loaded in previous.map_or(&[][..], |p| p.resources.as_slice()) {
        if let Some(text) = &loaded.source.text {
            before
                .entry(loaded.source.file.as_path())
                .or_insert_with(|| (&text.0, Vec::new()))
                .1
                .push(loaded);
        }
    }
    let mut unchanged = previous.is_some_and(|p| p.files == files);
    let mut set = ConfigSet::default();
    for file in &files {
        match read_file(file) {
            Ok(text) => match before.get(file.as_path()) {
                Some((old, resources)) if ***old == *text => {
                    set.resources.extend(resources.iter().map(|&l| l.clone()));
                }
                _ => {
                    unchanged = false;
                    let (loaded, mut es) = parse_text(text.into(), file);
                    set.add_parsed(loaded);
                    errors.append(&mut es);
                }
            },
            Err(e) => {
                unchanged = false;
                errors.push(e);
            }
        }
    }
    set.files = files;
    (set, errors, Unchanged(unchanged))
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), ConfigError> {
    let meta = fs::metadata(path).map_err(|e| read_err(path, &e))?;
    if !meta.is_dir() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let before = out.len();
    walk_dir(path, out)?;
    if out.len() == before {
        return Err(ConfigError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

fn walk_dir(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), ConfigError> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| read_err(dir, &e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    // Sorted so the load order, and therefore rule order among equal timestamps, is stable.
    entries.sort();
    for p in entries {
        let meta = fs::metadata(&p).map_err(|e| read_err(&p, &e))?;
        if meta.is_dir() {
            walk_dir(&p, out)?;
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(p);
        }
    }
    Ok(())
}

fn read_err(path: &Path, e: &std::io::Error) -> ConfigError {
    ConfigError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn read_file(path: &Path) -> Result<String, ConfigError> {
    // The size on disk is checked first for a clear message; the read is bounded as well
    // because special files (pipes, /dev/zero) report a size of 0.
    let size = fs::metadata(path).map_err(|e| read_err(path, &e))?.len();
    if size > MAX_FILE_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.to_path_buf(),
            size,
            limit: MAX_FILE_BYTES,
        });
    }
    let file = fs::File::open(path).map_err(|e| read_err(path, &e))?;
    read_limited(file, path)
}

/// Reads at most [`MAX_FILE_BYTES`] of UTF-8 text from `reader` (`path` names it in errors).
pub fn read_limited(reader: impl Read, path: &Path) -> Result<String, ConfigError> {
    let mut bytes = Vec::new();
    reader
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| read_err(path, &e))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.to_path_buf(),
            size: bytes.len() as u64,
            limit: MAX_FILE_BYTES,
        });
    }
    String::from_utf8(bytes).map_err(|e| ConfigError::Read {
        path: path.to_path_buf(),
        reason: format!(
            "not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ),
    })
}

/// Parses one file's text (`file` is only used in messages). Multi-document, `List`-aware.
pub fn parse_documents(text: &str, file: &Path) -> Result<Vec<Loaded>, ConfigErrors> {
    let (loaded, errors) = parse_text(text.into(), file);
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Parses one file's text, returning the resources that parsed and the errors of the rest.
///
/// A large file is parsed in two halves on two threads, cut at a `---` line near the middle
/// (1 000 services, 1.6 MB: ~250 → ~140 ms). The halves are joined as if parsed in one go:
/// documents and lines numbered from the top of the file, nothing after a syntax error, and
/// a document nested too deeply voids the whole file.
pub fn parse_text(text: Arc<str>, file: &Path) -> (Vec<Loaded>, Vec<ConfigError>) {
    let at = split_point(&text);
    parse_split(text, file, at)
}

/// For the fuzz harness: [`parse_text`] cut at byte `at`, which must start a line that is
/// exactly `---` (else `None`), whatever the file's size.
#[doc(hidden)]
pub fn parse_text_cut_at(
    text: Arc<str>,
    file: &Path,
    at: usize,
) -> Option<(Vec<Loaded>, Vec<ConfigError>)> {
    let ok = at < text.len() && bare_marker_at(&text, at) && cuttable(&text);
    ok.then(|| parse_split(text, file, Some(at)))
}

/// [`parse_text`], cut at `at` (the start of a `---` line) when given. The second half's
/// numbering is shifted by the first's documents and lines; a second half that stopped
/// ends the file there, as it would in one go.
fn parse_split(text: Arc<str>, file: &Path, at: Option<usize>) -> (Vec<Loaded>, Vec<ConfigError>) {
    let shared = SourceText(text.clone());
    let part = match at {
        Some(at) => {
            let (head, tail) = text.split_at(at);
            std::thread::scope(|scope| {
                let second = std::thread::Builder::new()
                    .name("veer-parse".into())
                    .spawn_scoped(scope, || parse_part(tail, file, &shared));
                let first = parse_part(head, file, &shared);
                let second = match second {
                    Ok(thread) => thread
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                    Err(_) => parse_part(tail, file, &shared),
                };
                if first.stopped || !first.content {
                    // Broken YAML in the first half (libyaml may word the error otherwise when
                    // the half ends where the marker stood), or nothing but comments and
                    // blank documents (serde_yaml counts an empty stream as one document):
                    // rare, so read the file whole.
                    parse_part(&text, file, &shared)
                } else {
                    first.then(second, line_breaks(head))
                }
            })
        }
        None => parse_part(&text, file, &shared),
    };
    let Part {
        loaded, mut errors, ..
    } = part;
    locate_field_errors(&text, &mut errors);
    (loaded, errors)
}

/// Whether a second thread can run beside this one (large reloads split their work in two).
pub(crate) fn second_cpu() -> bool {
    std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2
}

/// Files from this size are parsed in two halves (a thread's start is tens of µs; 256 KiB of
/// YAML take ~40 ms to parse).
const PARALLEL_PARSE_MIN: usize = 256 * 1024;

/// Where a large file can be cut in two: the start of the first line after the middle that
/// is exactly `---`. A document marker at column 0 ends whatever came before it (YAML forbids
/// it inside scalars), so each half is a stream of whole documents. `None` for small files,
/// on one CPU, and for files a cut could read differently ([`cuttable`]).
fn split_point(text: &str) -> Option<usize> {
    if text.len() < PARALLEL_PARSE_MIN || !second_cpu() || !cuttable(text) {
        return None;
    }
    let mut from = text.len() / 2;
    while let Some(i) = text.as_bytes()[from..]
        .windows(4)
        .position(|w| w == b"\n---")
    {
        let at = from + i + 1;
        if bare_marker_at(text, at) {
            return Some(at);
        }
        from = at;
    }
    None
}

/// Whether `at` starts a line that is exactly `---` (trailing blanks allowed).
fn bare_marker_at(text: &str, at: usize) -> bool {
    let bytes = text.as_bytes();
    at > 0
        && bytes[at - 1] == b'\n'
        && bytes[at..].starts_with(b"---")
        && bytes[at + 3..]
            .split(|&b| b == b'\n')
            .next()
            .is_some_and(|rest| rest.iter().all(u8::is_ascii_whitespace))
}

/// Whether the file may be cut at all: no directives (`%YAML` belongs to the next marker),
/// and only characters libyaml accepts (it rejects the others while reading ahead, at a point
/// that depends on its buffering rather than on documents).
fn cuttable(text: &str) -> bool {
    let printable = |c: char| {
        matches!(c, '\t' | '\n' | '\r' | ' '..='~' | '\u{85}' | '\u{a0}'..='\u{d7ff}'
            | '\u{e000}'..='\u{fffd}' | '\u{10000}'..)
    };
    !text.starts_with('%') && !text.contains("\n%") && text.chars().all(printable)
}

/// Line breaks as libyaml counts them: LF, CR LF, a lone CR, NEL, LS and PS.
fn line_breaks(text: &str) -> usize {
    let mut n = 0;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}' => n += 1,
            _ => {}
        }
    }
    n
}

/// The documents of one stretch of a file, numbered from 1 within it.
struct Part {
    loaded: Vec<Loaded>,
    errors: Vec<ConfigError>,
    /// Documents serde_yaml read (empty ones included), for numbering what follows.
    documents: usize,
    /// A syntax error: nothing after it was read.
    stopped: bool,
    /// A document nested too deeply: the part is that error alone.
    too_deep: bool,
    /// Some document was not empty.
    content: bool,
}

impl Part {
    /// This part followed by `next`, which starts `lines` lines further down the file.
    /// `self` must have read to its end (not `stopped`).
    fn then(mut self, mut next: Part, lines: usize) -> Part {
        let shift = self.documents;
        for l in &mut next.loaded {
            l.source.document += shift;
        }
        for e in &mut next.errors {
            match e {
                ConfigError::Yaml {
                    document,
                    line,
                    reason,
                    ..
                } => {
                    *document += shift;
                    if let Some(line) = line {
                        *line += lines;
                    }
                    *reason = shift_lines_in(reason, lines);
                }
                ConfigError::Field(f) => f.document += shift,
                ConfigError::Read { .. }
                | ConfigError::TooLarge { .. }
                | ConfigError::Empty { .. } => {}
            }
        }
        if next.too_deep {
            return next;
        }
        self.loaded.append(&mut next.loaded);
        self.errors.append(&mut next.errors);
        self.documents += next.documents;
        self.stopped = next.stopped;
        self.content |= next.content;
        self
    }
}

/// libyaml names a second position in some messages ("while scanning a quoted scalar at
/// line 4 column 18"): counted from the part's start, moved down by `lines`.
fn shift_lines_in(reason: &str, lines: usize) -> String {
    const AT: &str = " at line ";
    let mut out = String::with_capacity(reason.len());
    let mut rest = reason;
    while let Some(i) = rest.find(AT) {
        let (before, after) = rest.split_at(i + AT.len());
        out.push_str(before);
        let digits = digits_len(after);
        match after[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + lines).to_string()),
            Err(_) => out.push_str(&after[..digits]),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

/// Parses `text` (a whole file, or a stretch of one that starts at a document) into
/// resources, numbering documents from 1.
fn parse_part(text: &str, file: &Path, shared: &SourceText) -> Part {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    if let Some(e) = too_deep(text, file) {
        errors.push(e);
        return Part {
            loaded: out,
            errors,
            documents: 0,
            stopped: true,
            too_deep: true,
            content: true,
        };
    }
    let mut documents = 0;
    let mut stopped = false;
    let mut content = false;
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        documents = i + 1;
        let source = Source {
            file: file.to_path_buf(),
            document: i + 1,
            list_item: None,
            text: Some(shared.clone()),
        };
        let value = match Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                let loc = e.location();
                errors.push(ConfigError::Yaml {
                    file: file.to_path_buf(),
                    document: source.document,
                    line: loc.as_ref().map(|l| l.line()),
                    column: loc.as_ref().map(|l| l.column()),
                    reason: strip_location(&e.to_string()),
                });
                // A syntax error leaves the stream position unknown; later documents are not
                // trustworthy, so stop here (serde_yaml would stop anyway).
                stopped = true;
                break;
            }
        };
        if value.is_null() {
            continue; // empty document, e.g. a trailing `---`
        }
        content = true;
        if value.get("kind").and_then(Value::as_str) == Some("List") {
            let items = value
                .get("items")
                .and_then(Value::as_sequence)
                .cloned()
                .unwrap_or_default();
            for (j, item) in items.into_iter().enumerate() {
                let source = Source {
                    list_item: Some(j),
                    ..source.clone()
                };
                match parse_resource(item, &source) {
                    Ok(Some(r)) => out.push(Loaded {
                        source,
                        resource: r,
                    }),
                    Ok(None) => {}
                    Err(e) => errors.push(e),
                }
            }
            continue;
        }
        match parse_resource(value, &source) {
            Ok(Some(r)) => out.push(Loaded {
                source,
                resource: r,
            }),
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }
    Part {
        loaded: out,
        errors,
        documents,
        stopped,
        too_deep: false,
        content,
    }
}

/// Deepest nesting of collections accepted; serde_yaml's own limit.
const MAX_DEPTH: usize = 128;

/// Refuses nesting deeper than [`MAX_DEPTH`] before serde_yaml sees the text. serde_yaml
/// checks depth only after libyaml has scanned the whole document, and libyaml's scanner keeps
/// one simple-key slot per flow level and rescans them all for every token: 64 KiB of `{a: `
/// takes seconds, 1 MiB minutes (quadratic); 1 MiB of `[` takes 10 s and 170 MB. This pass
/// streams events (yaml-rust2, as `locate` does) and stops at the first level too deep, so its
/// cost is linear with at most `MAX_DEPTH` open levels. Syntax errors are left to serde_yaml.
fn too_deep(text: &str, file: &Path) -> Option<ConfigError> {
    use yaml_rust2::parser::{Event, Parser};
    let mut parser = Parser::new_from_str(text);
    let (mut depth, mut document) = (0usize, 0usize);
    let error = |document: usize, mark: &yaml_rust2::scanner::Marker| ConfigError::Yaml {
        file: file.to_path_buf(),
        document: document.max(1),
        line: Some(mark.line()),
        column: Some(mark.col() + 1),
        reason: format!("recursion limit exceeded: nesting deeper than {MAX_DEPTH} levels"),
    };
    loop {
        match parser.next_token() {
            Ok((Event::StreamEnd, _)) => return None,
            Ok((Event::DocumentStart, _)) => document += 1,
            Ok((Event::SequenceStart(..) | Event::MappingStart(..), mark)) => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Some(error(document, &mark));
                }
            }
            Ok((Event::SequenceEnd | Event::MappingEnd, _)) => depth = depth.saturating_sub(1),
            Ok(_) => {}
            // yaml-rust2's scanner looks ahead for simple keys and stops at 255 flow levels,
            // possibly before the parser has reported level 129.
            Err(e) if e.info() == "recursion limit exceeded" => {
                return Some(error(document, e.marker()))
            }
            // Other syntax errors are serde_yaml's to report, with its messages.
            Err(_) => return None,
        }
    }
}

/// At most this many findings of one run get a position (all are found in one pass per file;
/// the cap bounds the bookkeeping for a generated config with a problem in every document).
pub(crate) const MAX_LOCATED: usize = 10_000;

/// Fills in line and column of the field errors of one file, in one pass over its text.
fn locate_field_errors(text: &str, errors: &mut [ConfigError]) {
    let mut targets: Vec<&mut FieldError> = errors
        .iter_mut()
        .filter_map(|e| match e {
            ConfigError::Field(f) => Some(f.as_mut()),
            _ => None,
        })
        .take(MAX_LOCATED)
        .collect();
    if targets.is_empty() {
        return;
    }
    let queries: Vec<Query> = targets
        .iter()
        .map(|f| Query {
            document: f.document,
            path: document_path(f.list_item, &f.field),
        })
        .collect();
    for (f, pos) in targets.iter_mut().zip(locate::locate_all(text, &queries)) {
        f.set_position(pos);
    }
}

fn document_path(list_item: Option<usize>, field: &str) -> String {
    Source {
        file: PathBuf::new(),
        document: 0,
        list_item,
        text: None,
    }
    .document_path(field)
}

/// serde_yaml puts " at line L column C" into messages; the position is printed up front.
fn strip_location(msg: &str) -> String {
    let Some(start) = msg.find(" at line ") else {
        return msg.to_string();
    };
    let rest = &msg[start + " at line ".len()..];
    let line_len = digits_len(rest);
    let Some(after) = rest[line_len..].strip_prefix(" column ") else {
        return msg.to_string();
    };
    let col_len = digits_len(after);
    if line_len == 0 || col_len == 0 {
        return msg.to_string();
    }
    format!("{}{}", &msg[..start], &after[col_len..])
}

/// Length of the run of ASCII digits `s` starts with.
fn digits_len(s: &str) -> usize {
    s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len())
}

/// One document → a resource, `None` for kinds veer does not read.
fn parse_resource(value: Value, source: &Source) -> Result<Option<Resource>, ConfigError> {
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>")
        .to_string();
    let namespace = value
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let field_err = |field: &str, reason: String| {
        let kind = if kind.is_empty() { "<no kind>" } else { &kind };
        ConfigError::Field(Box::new(FieldError::unlocated(
            source,
            kind,
            &namespace,
            &name,
            field.to_string(),
            reason,
        )))
    };
    let Value::Mapping(mut map) = value else {
        return Err(field_err("", "a resource must be a YAML mapping".into()));
    };
    if kind.is_empty() {
        return Err(field_err(
            "kind",
            "missing: every resource needs `kind`".into(),
        ));
    }
    if api_version.is_empty() {
        return Err(field_err(
            "apiVersion",
            "missing: every resource needs `apiVersion`".into(),
        ));
    }
    let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
    let istio_kind = matches!(
        kind.as_str(),
        "VirtualService" | "DestinationRule" | "Gateway" | "ServiceEntry" | "WorkloadEntry"
    );
    if group == "networking.istio.io" {
        if !istio_kind {
            tracing::debug!(%kind, %name, "{source}: skipping Istio kind veer does not use");
            return Ok(None);
        }
        if !ISTIO_VERSIONS.contains(&api_version.as_str()) {
            return Err(field_err(
                "apiVersion",
                format!(
                    "unsupported version {api_version:?}; use one of {}",
                    ISTIO_VERSIONS.join(", ")
                ),
            ));
        }
        // Written by the API server, not part of the schema the user controls.
        map.remove("status");
    } else if !(api_version == "v1" && matches!(kind.as_str(), "Service" | "Pod")) {
        tracing::debug!(%api_version, %kind, %name, "{source}: skipping kind veer does not route on");
        return Ok(None);
    }
    map.remove("apiVersion");
    map.remove("kind");
    let typed = |map: Mapping| -> Result<Resource, ConfigError> {
        let v = Value::Mapping(map);
        Ok(match kind.as_str() {
            "VirtualService" => Resource::VirtualService(typed_from(v, &field_err)?),
            "DestinationRule" => Resource::DestinationRule(typed_from(v, &field_err)?),
            "Gateway" => Resource::Gateway(typed_from(v, &field_err)?),
            "ServiceEntry" => Resource::ServiceEntry(typed_from(v, &field_err)?),
            "WorkloadEntry" => Resource::WorkloadEntry(typed_from(v, &field_err)?),
            "Service" => Resource::Service(typed_from(v, &field_err)?),
            "Pod" => Resource::Pod(typed_from(v, &field_err)?),
            _ => unreachable!("kind filtered above"),
        })
    };
    typed(map).map(Some)
}

fn typed_from<T: DeserializeOwned>(
    value: Value,
    field_err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let (field, reason) = explain_serde_error(&path, &e.into_inner().to_string());
        field_err(&field, reason)
    })
}

/// Rewrites serde's terse messages into sentences, with a suggestion for near-miss names.
/// An unknown field's path is extended by the field's own name, so its line can be found.
fn explain_serde_error(path: &str, msg: &str) -> (String, String) {
    // serde_path_to_error already ends the path with the unknown key; older versions did not.
    let join = |name: &str| {
        if path == name || path.ends_with(&format!(".{name}")) {
            path.to_string()
        } else if path.is_empty() {
            name.to_string()
        } else {
            format!("{path}.{name}")
        }
    };
    if let Some(rest) = msg.strip_prefix("unknown field ") {
        let words = backticked(rest);
        if let Some((unknown, allowed)) = words.split_first() {
            let mut reason = format!("unknown field `{unknown}`");
            if let Some(s) = suggest(unknown, allowed.iter().map(String::as_str)) {
                reason.push_str(&format!("; did you mean `{s}`?"));
            }
            if allowed.is_empty() {
                reason.push_str(" (no fields are allowed here)");
            } else {
                reason.push_str(&format!(" (allowed here: {})", allowed.join(", ")));
            }
            return (join(unknown), reason);
        }
    }
    if let Some(rest) = msg.strip_prefix("unknown variant ") {
        let words = backticked(rest);
        if let Some((unknown, allowed)) = words.split_first() {
            let mut reason = format!("`{unknown}` is not a valid value");
            if let Some(s) = suggest(unknown, allowed.iter().map(String::as_str)) {
                reason.push_str(&format!("; did you mean `{s}`?"));
            }
            reason.push_str(&format!(" (use one of: {})", allowed.join(", ")));
            return (path.to_string(), reason);
        }
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some((found, expected)) = msg
            .strip_prefix(prefix)
            .and_then(|rest| rest.rsplit_once(", expected "))
        {
            return (
                path.to_string(),
                format!("expected {}, found {found}", describe_type(expected)),
            );
        }
    }
    (path.to_string(), msg.to_string())
}

/// serde names Rust types (`u32`, `struct TcpRoute`); users write YAML.
fn describe_type(expected: &str) -> String {
    match expected {
        "i8" | "i16" | "i32" | "i64" | "isize" => "an integer".into(),
        "u8" | "u16" | "u32" | "u64" | "usize" => "a non-negative integer".into(),
        "f32" | "f64" => "a number".into(),
        "a boolean" | "bool" => "true or false".into(),
        "a string" | "a borrowed string" => "a string".into(),
        "a sequence" => "a list".into(),
        e if e.starts_with("struct ") || e.starts_with("a map") => "a mapping".into(),
        e => e.to_string(),
    }
}

/// The `quoted` words of a serde message, in order.
fn backticked(s: &str) -> Vec<String> {
    s.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// The candidate `word` was most likely meant as: equal ignoring case and `_`/`-`, or within
/// a small edit distance (transpositions count once: `wieght` → `weight`).
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let norm = |s: &str| -> String {
        s.chars()
            .filter(|c| *c != '_' && *c != '-')
            .flat_map(char::to_lowercase)
            .collect()
    };
    let w = norm(word);
    // Short names are close to too many others to guess from.
    let max = if w.chars().count() <= 4 { 1 } else { 2 };
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let d = edit_distance(&w, &norm(c));
        if d <= max && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

/// Optimal-string-alignment distance: insertions, deletions, substitutions and adjacent
/// transpositions each cost 1.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // Names are short; a full matrix is simplest.
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Loaded>, ConfigErrors> {
        parse_documents(text, Path::new("test.yaml"))
    }

    const VS: &str = r#"
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: tcp-echo
spec:
  hosts: [tcp-echo]
  tcp:
  - match:
    - port: 9000
    route:
    - destination: {host: tcp-echo, port: {number: 9000}, subset: v1}
      weight: 80
    - destination: {host: tcp-echo, port: {number: 9000}, subset: v2}
      weight: 20
"#;

    #[test]
    fn parses_virtual_service() {
        let loaded = parse(VS).unwrap();
        assert_eq!(loaded.len(), 1);
        let Resource::VirtualService(vs) = &loaded[0].resource else {
            panic!()
        };
        assert_eq!(vs.metadata.name, "tcp-echo");
        assert_eq!(vs.spec.tcp[0].route[1].weight, Some(20));
        assert_eq!(vs.spec.tcp[0].matches[0].port, Some(9000));
        assert_eq!(loaded[0].source.document, 1);
    }

    #[test]
    fn multi_document_list_and_skipped_kinds() {
        let text = format!(
            "{VS}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: x}}\nspec: {{replicas: 1}}\n---\n\
             apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {{name: s, namespace: ns1}}\n  \
             spec: {{clusterIP: 10.0.0.1, ports: [{{port: 80, name: http}}]}}\n---\n"
        );
        let loaded = parse(&text).unwrap();
        assert_eq!(loaded.len(), 2);
        assert_eq!(loaded[1].source.document, 3);
        assert_eq!(loaded[1].source.list_item, Some(0));
        assert_eq!(loaded[1].resource.metadata().namespace(), "ns1");
    }

    #[test]
    fn typo_names_file_document_resource_and_field() {
        let text = format!("{VS}---\n{}", VS.replace("weight: 20", "wieght: 20"));
        let err = parse(&text).unwrap_err();
        assert_eq!(err.0.len(), 1);
        let msg = err.to_string();
        // VS starts with a blank line and has 15 lines; document 2 starts after the `---`.
        assert!(msg.contains("test.yaml:31:7: document 2"), "{msg}");
        assert!(msg.contains("VirtualService default/tcp-echo"), "{msg}");
        assert!(msg.contains("field `spec.tcp[0].route[1].wieght`"), "{msg}");
        assert!(msg.contains("did you mean `weight`?"), "{msg}");
    }

    #[test]
    fn wrong_type_names_the_field() {
        let err = parse(&VS.replace("weight: 80", "weight: eighty"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("spec.tcp[0].route[0].weight"), "{err}");
        assert!(
            err.contains("expected an integer, found string \"eighty\""),
            "{err}"
        );
        let err = parse(&VS.replace("- port: 9000", "- port: -1"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("expected a non-negative integer, found integer `-1`"),
            "{err}"
        );
    }

    #[test]
    fn bad_duration_names_the_field() {
        let text = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: a\n  \
                    trafficPolicy: {connectionPool: {tcp: {connectTimeout: 10}}}\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(
            err.contains("spec.trafficPolicy.connectionPool.tcp.connectTimeout"),
            "{err}"
        );
    }

    #[test]
    fn unsupported_istio_version_and_missing_kind() {
        let err = parse(&VS.replace("v1alpha3", "v9"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("apiVersion"), "{err}");
        let err = parse("apiVersion: v1\nmetadata: {name: x}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("field `kind`"), "{err}");
    }

    #[test]
    fn invalid_yaml_is_an_error_not_a_panic() {
        let err = parse("a: [unclosed\n").unwrap_err().to_string();
        assert!(
            err.contains("test.yaml:2:1: document 1: invalid YAML"),
            "{err}"
        );
        assert!(parse("\u{0}\u{1}garbage: : :").is_err());
    }

    #[test]
    fn istio_status_is_ignored() {
        let text = format!("{VS}status: {{validationMessages: []}}\n");
        assert!(parse(&text).is_ok());
    }

    #[test]
    fn near_miss_names_get_suggestions() {
        let fields = ["destinationSubnets", "port", "sourceLabels", "gateways"];
        assert_eq!(
            suggest("destinationSubnet", fields),
            Some("destinationSubnets")
        );
        assert_eq!(suggest("Port", fields), Some("port"));
        assert_eq!(suggest("source_labels", fields), Some("sourceLabels"));
        assert_eq!(suggest("wieght", ["destination", "weight"]), Some("weight"));
        assert_eq!(suggest("sni_hosts", ["sniHosts", "port"]), Some("sniHosts"));
        assert_eq!(suggest("colour", ["destination", "weight"]), None);
        assert_eq!(suggest("abc", ["xyz"]), None);
        let (field, reason) = explain_serde_error(
            "spec.trafficPolicy.loadBalancer.simple",
            "unknown variant `ROUND_ROBN`, expected one of `UNSPECIFIED`, `ROUND_ROBIN`",
        );
        assert_eq!(field, "spec.trafficPolicy.loadBalancer.simple");
        assert!(reason.contains("did you mean `ROUND_ROBIN`?"), "{reason}");
        assert!(
            reason.contains("use one of: UNSPECIFIED, ROUND_ROBIN"),
            "{reason}"
        );
    }

    #[test]
    fn list_items_are_located_under_items() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: s}\n  spec:\n    ports: [{port: x}]\n";
        let err = parse(text).unwrap_err().to_string();
        assert!(
            err.contains("test.yaml:8:14: document 1 items[0] (Service default/s)"),
            "{err}"
        );
    }

    // --- hostile input: each must end in an error, quickly, without a panic ---------------

    fn quick<T>(f: impl FnOnce() -> T) -> T {
        let start = std::time::Instant::now();
        let out = f();
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "took {:?}",
            start.elapsed()
        );
        out
    }

    #[test]
    fn deep_nesting_is_an_error() {
        for deep in [
            "[".repeat(10_000),
            "a:\n".to_string() + &"- ".repeat(10_000),
            "{a: ".repeat(10_000),
        ] {
            let err = quick(|| parse(&deep)).unwrap_err().to_string();
            assert!(err.contains("recursion limit exceeded"), "{err}");
        }
    }

    #[test]
    fn billion_laughs_is_an_error() {
        let mut bomb = String::from(
            "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        let mut prev = 'a';
        for c in 'b'..='j' {
            let refs = vec![format!("*{prev}"); 9].join(",");
            bomb.push_str(&format!("{c}: &{c} [{refs}]\n"));
            prev = c;
        }
        let err = quick(|| parse(&bomb)).unwrap_err().to_string();
        assert!(err.contains("repetition limit exceeded"), "{err}");
    }

    #[test]
    fn huge_scalar_is_a_field_error_not_a_crash() {
        let big = "x".repeat(8 * 1024 * 1024);
        let text = format!("{VS}---\napiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec: {{ports: [{{port: {big}}}]}}\n");
        let err = quick(|| parse(&text)).unwrap_err().to_string();
        assert!(
            err.contains("spec.ports[0].port"),
            "{}",
            &err[..200.min(err.len())]
        );
    }

    #[test]
    fn oversized_files_are_refused_before_parsing() {
        let dir = std::env::temp_dir().join(format!("veer-load-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("big.yaml");
        let line = "# padding padding padding padding padding padding padding padding\n";
        let text = line.repeat((20 * 1024 * 1024) / line.len() + 1);
        fs::write(&path, text).unwrap();
        let err = load_paths(std::slice::from_ref(&path))
            .unwrap_err()
            .to_string();
        assert!(err.contains("larger than the 16777216-byte limit"), "{err}");
        // A reader that never ends stops one byte past the limit.
        let err = read_limited(std::io::repeat(b'a'), Path::new("-")).unwrap_err();
        assert!(matches!(err, ConfigError::TooLarge { size, .. } if size == MAX_FILE_BYTES + 1));
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Every `---` line of each text as a cut: the halves must read exactly as the whole,
    /// numbering, positions, errors and what is skipped after a syntax error included.
    #[test]
    fn a_file_parsed_in_halves_reads_as_in_one_go() {
        let svc = |name: &str| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  clusterIP: 10.96.0.9\n  ports: [{{port: 9000}}]\n")
        };
        let typo = "apiVersion: v1\nkind: Service\nmetadata: {name: typo}\nspec:\n  portz: []\n";
        let list = format!(
            "apiVersion: v1\nkind: List\nitems:\n- {}",
            svc("in-list").replace('\n', "\n  ")
        );
        let broken = "apiVersion: v1\nkind: Service\nmetadata: {name: 'unterminated\n";
        let deep = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: deep}}\nspec: {}{}\n",
            "[".repeat(200),
            "]".repeat(200)
        );
        let texts = [
            format!(
                "{}---\n{}---\n{typo}---\n{list}\n---\n{}",
                svc("a"),
                svc("b"),
                svc("c")
            ),
            format!(
                "---\n{}---\n---\n{typo}---  \r\n{}...\n---\n{}",
                svc("a"),
                svc("b"),
                svc("c")
            ),
            format!("{}---\n{broken}---\n{}---\n{typo}", svc("a"), svc("b")),
            format!("{}---\n{typo}---\n{broken}---\n{}", svc("a"), svc("b")),
            format!("{}---\n{deep}---\n{}", svc("a"), svc("b")),
            format!("{}---\n{typo}---\n{}---\n{deep}", svc("a"), svc("b")),
        ];
        let file = Path::new("halves.yaml");
        let show = |(loaded, errors): (Vec<Loaded>, Vec<ConfigError>)| {
            let loaded: Vec<String> = loaded
                .iter()
                .map(|l| format!("{} {:?}", l.source, l.resource))
                .collect();
            let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
            (loaded, errors)
        };
        for text in texts {
            let whole = show(parse_split(text.as_str().into(), file, None));
            assert!(!whole.0.is_empty() || !whole.1.is_empty(), "{text}");
            let cuts: Vec<usize> = text.match_indices("\n---").map(|(i, _)| i + 1).collect();
            assert!(cuts.len() >= 2, "{text}");
            for at in cuts {
                let halves = show(parse_split(text.as_str().into(), file, Some(at)));
                assert_eq!(halves, whole, "cut at byte {at} of:\n{text}");
            }
        }
    }

    #[test]
    fn only_large_files_are_cut_and_only_at_a_bare_marker_line() {
        assert_eq!(split_point("a: 1\n---\nb: 2\n"), None);
        let doc = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n";
        let big = format!("---\n{doc}").repeat(PARALLEL_PARSE_MIN / doc.len() + 1);
        if second_cpu() {
            let at = split_point(&big).expect("a large file is cut");
            assert!(
                at >= big.len() / 2 && big[at..].starts_with("---\n"),
                "{at}"
            );
        }
        // A marker with content after it is not a cut; directives forbid cutting.
        let no_bare = format!("{}{}", " ".repeat(PARALLEL_PARSE_MIN), "\n--- {a: 1}\n");
        assert_eq!(split_point(&no_bare), None);
        assert_eq!(split_point(&format!("%YAML 1.2\n{big}")), None);
    }

    #[test]
    fn reload_parses_only_changed_files() {
        let dir = std::env::temp_dir().join(format!("veer-reuse-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let svc = |name: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
                 spec: {{clusterIP: 10.96.0.9, ports: [{{port: 9000}}], selector: {{app: {name}}}}}\n"
            )
        };
        fs::write(dir.join("a.yaml"), svc("a")).unwrap();
        fs::write(dir.join("b.yaml"), svc("b") + "---\n" + &svc("b2")).unwrap();
        // Parsed from a file: shares that file's text.
        let text_of = |l: &Loaded| Arc::clone(&l.source.text.as_ref().unwrap().0);
        let paths = [dir.clone()];
        let first = load_paths(&paths).unwrap();
        assert_eq!(first.resources.len(), 3);

        // Nothing changed: same resources, not parsed again (the very same text), and said so.
        let (again, unchanged) = load_paths_reusing(&paths, &first).unwrap();
        assert_eq!(unchanged, Unchanged(true));
        assert_eq!(again, first);
        for (x, y) in again.resources.iter().zip(&first.resources) {
            assert!(Arc::ptr_eq(&text_of(x), &text_of(y)), "{} reused", x.source);
            assert!(Arc::ptr_eq(x, y), "{} shared, not copied", x.source);
        }

        // One file edited: only it is parsed; the result is what a fresh load gives.
        fs::write(dir.join("b.yaml"), svc("b3")).unwrap();
        let (edited, unchanged) = load_paths_reusing(&paths, &first).unwrap();
        assert_eq!(unchanged, Unchanged(false));
        assert_eq!(edited, load_paths(&paths).unwrap());
        assert!(Arc::ptr_eq(&edited.resources[0], &first.resources[0]));
        assert!(!Arc::ptr_eq(
            &text_of(&edited.resources[1]),
            &text_of(&first.resources[1])
        ));
        assert_eq!(edited.resources[1].resource.metadata().name, "b3");

        // A file added or removed is a change too, and errors still fail the load.
        fs::write(dir.join("c.yaml"), svc("c")).unwrap();
        let (added, unchanged) = load_paths_reusing(&paths, &edited).unwrap();
        assert_eq!(unchanged, Unchanged(false));
        assert_eq!(added.resources.len(), 3);
        fs::remove_file(dir.join("c.yaml")).unwrap();
        let (removed, unchanged) = load_paths_reusing(&paths, &added).unwrap();
        assert_eq!(unchanged, Unchanged(false));
        assert_eq!(removed, edited);
        fs::write(dir.join("a.yaml"), "kind: [").unwrap();
        assert!(load_paths_reusing(&paths, &removed).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn random_bytes_are_errors_not_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let alphabet = b"ab: -[]{}&*!|>'\"#%@`,?\n\t\r\\\x00\x07";
        for i in 0..2000 {
            let len = rng.gen_range(0..200);
            let bytes: Vec<u8> = if i % 2 == 0 {
                (0..len).map(|_| rng.gen()).collect()
            } else {
                (0..len)
                    .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                    .collect()
            };
            match read_limited(&bytes[..], Path::new("r.yaml")) {
                Ok(text) => {
                    let _ = parse(&text);
                }
                Err(e) => assert!(matches!(e, ConfigError::Read { .. })),
            }
        }
    }
}
