//! Finding where a field path (`spec.tcp[0].route[1].weight`) is written in a YAML file.
//!
//! serde gives paths, not positions, because resources are deserialized from an in-memory
//! `Value`. This module maps paths back to line and column by walking the file once with an
//! event parser that keeps position markers. It runs only when there are errors or warnings to
//! report, so valid configs pay nothing; aliases are not expanded, so a hostile file costs one
//! linear pass.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::Marker;

/// A position in a file, 1-based like an editor shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl Position {
    fn from_marker(m: Marker) -> Self {
        // yaml-rust2 counts lines from 1 but columns from 0.
        Position {
            line: m.line(),
            column: m.col() + 1,
        }
    }
}

/// What to find: the 1-based document (as serde_yaml numbers them, empty documents included)
/// and a field path from the document's root. An empty path means the document itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub document: usize,
    pub path: String,
}

/// Locates every query in one pass over `text`. Each answer is the position of the deepest
/// node written on the way to the path: the key itself for a mapping entry, the item for a
/// sequence element, or the nearest written ancestor when the field is absent (a missing
/// required field points at its parent). `None` when the document is not found or the text
/// cannot be parsed up to it.
pub fn locate_all(text: &str, queries: &[Query]) -> Vec<Option<Position>> {
    // Per query: how much of its path the best node so far consumed, and where that node is.
    let mut best: Vec<Option<(usize, Marker)>> = vec![None; queries.len()];
    let Some(last_doc) = queries.iter().map(|q| q.document).max() else {
        return Vec::new();
    };
    let mut by_doc: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, q) in queries.iter().enumerate() {
        by_doc.entry(q.document).or_default().push(i);
    }
    let mut parser = Parser::new_from_str(text);
    let mut document = 0usize;
    let mut walker: Option<Walker> = None;
    // A scan error ends the walk: later documents are unreadable; keep what was found.
    while let Ok((event, mark)) = parser.next_token() {
        match event {
            Event::StreamEnd => break,
            Event::DocumentStart => {
                document += 1;
                if document > last_doc {
                    break;
                }
                let live: Vec<Live> = by_doc
                    .remove(&document)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|query| Live { query, offset: 0 })
                    .collect();
                walker = (!live.is_empty()).then(|| Walker::new(live));
            }
            Event::DocumentEnd => walker = None,
            other => {
                if let Some(w) = walker.as_mut() {
                    w.event(other, mark, queries, &mut best);
                }
            }
        }
    }
    best.into_iter()
        .map(|m| m.map(|(_, mark)| Position::from_marker(mark)))
        .collect()
}

/// Convenience for one query.
pub fn locate(text: &str, document: usize, path: &str) -> Option<Position> {
    locate_all(
        text,
        &[Query {
            document,
            path: path.to_string(),
        }],
    )
    .pop()
    .flatten()
}

/// A query still on the path being walked, and how much of its path is consumed.
#[derive(Debug, Clone, Copy)]
struct Live {
    query: usize,
    offset: usize,
}

#[derive(Debug)]
enum Frame {
    Map {
        /// Queries whose path runs through this mapping.
        live: Vec<Live>,
        /// The next node is a key (else a value).
        at_key: bool,
        /// The last key read (`None` for a complex, non-scalar key) and where it was written.
        key: Option<(String, Marker)>,
        /// Queries that point at this mapping, to move to its first key: a block mapping's
        /// start marker sits after its first key, not at it.
        pending: Vec<usize>,
        first_key_seen: bool,
        start: Marker,
    },
    Seq {
        live: Vec<Live>,
        next: usize,
    },
}

/// Tracks the path through one document.
struct Walker {
    stack: Vec<Frame>,
    /// Queries live at the document root (before its root node starts).
    root: Option<Vec<Live>>,
}

impl Walker {
    fn new(live: Vec<Live>) -> Self {
        Walker {
            stack: Vec::new(),
            root: Some(live),
        }
    }

    fn event(
        &mut self,
        event: Event,
        mark: Marker,
        queries: &[Query],
        best: &mut [Option<(usize, Marker)>],
    ) {
        match event {
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.finish_node();
            }
            Event::Scalar(ref value, ..) => {
                if self.at_key() {
                    self.key_read(Some((value.clone(), mark)), best);
                    return;
                }
                self.node_start(mark, queries, best);
                self.finish_node();
            }
            Event::Alias(_) => {
                if self.at_key() {
                    self.key_read(None, best);
                    return;
                }
                self.node_start(mark, queries, best);
                self.finish_node();
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let is_map = matches!(event, Event::MappingStart(..));
                // A complex key: walk it without matching anything.
                let (live, targeted) = if self.at_key() {
                    (Vec::new(), Vec::new())
                } else {
                    self.node_start(mark, queries, best)
                };
                self.stack.push(if is_map {
                    Frame::Map {
                        live,
                        at_key: true,
                        key: None,
                        pending: targeted,
                        first_key_seen: false,
                        start: mark,
                    }
                } else {
                    Frame::Seq { live, next: 0 }
                });
            }
            _ => {}
        }
    }

    fn at_key(&self) -> bool {
        matches!(self.stack.last(), Some(Frame::Map { at_key: true, .. }))
    }

    /// A mapping key was read; the next node is its value.
    fn key_read(&mut self, key: Option<(String, Marker)>, best: &mut [Option<(usize, Marker)>]) {
        if let Some(Frame::Map {
            at_key,
            key: k,
            pending,
            first_key_seen,
            start,
            ..
        }) = self.stack.last_mut()
        {
            if !*first_key_seen {
                *first_key_seen = true;
                if let Some((_, km)) = &key {
                    if km.index() < start.index() {
                        for q in pending.drain(..) {
                            if let Some((offset, _)) = best[q] {
                                best[q] = Some((offset, *km));
                            }
                        }
                    }
                }
            }
            *k = key;
            *at_key = false;
        }
    }

    /// A value or item node starts at `mark`. Returns the queries whose path continues into it
    /// and those that end exactly at it.
    fn node_start(
        &mut self,
        mark: Marker,
        queries: &[Query],
        best: &mut [Option<(usize, Marker)>],
    ) -> (Vec<Live>, Vec<usize>) {
        let mut next = Vec::new();
        let mut exact = Vec::new();
        let (parent, segment, at): (Vec<Live>, Segment, Marker) = match self.stack.last() {
            None => match self.root.take() {
                // The document's root node: every query passes through it.
                Some(live) => {
                    for l in &live {
                        best[l.query] = Some((0, mark));
                        if queries[l.query].path.is_empty() {
                            exact.push(l.query);
                        }
                    }
                    return (live, exact);
                }
                None => return (next, exact),
            },
            Some(Frame::Map { live, key, .. }) => match key {
                Some((k, km)) => (live.clone(), Segment::Key(k.clone()), *km),
                None => return (next, exact),
            },
            Some(Frame::Seq { live, next: i }) => (live.clone(), Segment::Index(*i), mark),
        };
        for l in parent {
            let rest = &queries[l.query].path[l.offset..];
            if let Some(used) = segment.consumes(rest) {
                let offset = l.offset + used;
                // Deeper wins; among equals (a key `app` vs `app.kubernetes.io/name`), the
                // first. Keys with dots can make two siblings both consume part of a path.
                if best[l.query].is_none_or(|(o, _)| offset > o) {
                    best[l.query] = Some((offset, at));
                }
                if offset == queries[l.query].path.len() {
                    exact.push(l.query);
                } else {
                    next.push(Live {
                        query: l.query,
                        offset,
                    });
                }
            }
        }
        // Only a sequence item's own marker may be a block mapping's late start marker.
        if !matches!(segment, Segment::Index(_)) {
            exact.clear();
        }
        (next, exact)
    }

    /// A node ended: the parent mapping expects a key again, or the sequence moves on.
    fn finish_node(&mut self) {
        match self.stack.last_mut() {
            Some(Frame::Map { at_key, key, .. }) => {
                if !*at_key {
                    *at_key = true;
                    *key = None;
                } else {
                    // A complex key finished; its value comes next.
                    *at_key = false;
                }
            }
            Some(Frame::Seq { next, .. }) => *next += 1,
            None => {}
        }
    }
}

enum Segment {
    Key(String),
    Index(usize),
}

impl Segment {
    /// How many bytes of `rest` this segment consumes (including a following `.`), if the path
    /// continues through it. Keys may contain dots (`app.kubernetes.io/name`), so a key matches
    /// when `rest` starts with it followed by the end, `.` or `[`.
    fn consumes(&self, rest: &str) -> Option<usize> {
        let head = match self {
            Segment::Key(k) => k.clone(),
            Segment::Index(i) => format!("[{i}]"),
        };
        let after = rest.strip_prefix(head.as_str())?;
        match after.as_bytes().first() {
            None => Some(head.len()),
            Some(b'.') => Some(head.len() + 1),
            Some(b'[') => Some(head.len()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# leading comment\n---\napiVersion: v1\nkind: VirtualService\nmetadata:\n  name: a\nspec:\n  tcp:\n  - match:\n    - port: 1\n    route:\n    - destination: {host: a}\n      weight: 1\n    - destination:\n        host: b\n      wieght: 2\n...\n---\n# second\nspec:\n  hosts: [x, \"y\"]\n";

    fn at(doc: usize, path: &str) -> Option<(usize, usize)> {
        locate(TEXT, doc, path).map(|p| (p.line, p.column))
    }

    #[test]
    fn finds_keys_and_items() {
        assert_eq!(at(1, "kind"), Some((4, 1)));
        assert_eq!(at(1, "spec.tcp[0].route[1].wieght"), Some((16, 7)));
        assert_eq!(at(1, "spec.tcp[0].route[0].weight"), Some((13, 7)));
        assert_eq!(
            at(1, "spec.tcp[0].route[0].destination.host"),
            Some((12, 21))
        );
        assert_eq!(at(1, "spec.tcp[0].match[0].port"), Some((10, 7)));
        // A sequence item that is a block mapping points at its first key.
        assert_eq!(at(1, "spec.tcp[0].route[1]"), Some((14, 7)));
        assert_eq!(at(1, "spec.tcp[0]"), Some((9, 5)));
        assert_eq!(at(2, "spec.hosts[1]"), Some((21, 14)));
    }

    #[test]
    fn absent_fields_point_at_the_nearest_ancestor() {
        assert_eq!(
            at(1, "spec.tcp[0].route[0].destination.subset"),
            Some((12, 7))
        );
        assert_eq!(at(1, "spec.tls[0].match"), Some((7, 1)));
        assert_eq!(at(2, ""), Some((20, 1)));
        assert_eq!(at(3, "spec"), None);
    }

    #[test]
    fn dotted_keys_and_many_queries() {
        let text = "a:\n  app.kubernetes.io/name: x\n  app: y\n";
        let qs = [
            Query {
                document: 1,
                path: "a.app.kubernetes.io/name".into(),
            },
            Query {
                document: 1,
                path: "a.app".into(),
            },
        ];
        let got = locate_all(text, &qs);
        assert_eq!(got[0], Some(Position { line: 2, column: 3 }));
        assert_eq!(got[1], Some(Position { line: 3, column: 3 }));
    }

    #[test]
    fn document_numbers_follow_serde_yaml() {
        // Empty documents count, as serde_yaml yields them (as null).
        let text = "---\n---\na: 1\n--- \nb: 2\n";
        assert_eq!(locate(text, 2, "a").map(|p| p.line), Some(3));
        assert_eq!(locate(text, 3, "b").map(|p| p.line), Some(5));
    }

    #[test]
    fn hostile_input_is_cheap() {
        // Aliases are not expanded, so a billion-laughs document is one linear pass.
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x]\n");
        let mut prev = 'a';
        for c in 'b'..='z' {
            bomb.push_str(&format!("{c}: &{c} [*{prev}, *{prev}, *{prev}, *{prev}]\n"));
            prev = c;
        }
        assert_eq!(locate(&bomb, 1, "z[3]").map(|p| p.line), Some(26));
        let deep = "[".repeat(100_000);
        assert_eq!(locate(&deep, 1, "x"), None);
        assert_eq!(locate("\u{0}\u{1}: : :", 1, "x"), None);
    }
}
