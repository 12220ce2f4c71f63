//! Splitting a YAML stream into its documents as text, so that documents `veer inject` leaves
//! alone are written back byte for byte (serde_yaml would drop their comments and quoting).
//!
//! YAML forbids a document marker (`---` or `...` at column 0) inside any scalar, block or
//! quoted, so a line-based split finds exactly the documents a YAML parser finds. Each piece
//! keeps its own `---` line; concatenating the pieces gives the input back unchanged.

/// One piece of the input: a document, or the comments before the first document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece<'a> {
    /// The exact text, marker line included.
    pub text: &'a str,
    /// 1-based line of the piece's first line in the input.
    pub first_line: usize,
    /// Starts with a `---` line.
    pub has_marker: bool,
    /// A YAML document (explicit `---`, or content); `false` for a comment-only prelude.
    pub is_document: bool,
}

fn is_marker(line: &str) -> bool {
    let line = line.trim_end_matches(['\n', '\r']);
    line == "---" || (line.starts_with("---") && line[3..].starts_with([' ', '\t']))
}

fn is_end(line: &str) -> bool {
    let line = line.trim_end_matches(['\n', '\r']);
    line == "..." || (line.starts_with("...") && line[3..].starts_with([' ', '\t']))
}

/// A line that carries no content: blank, or a comment.
pub fn is_blank_or_comment(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#')
}

/// Splits `text` into pieces. Concatenating `piece.text` over the result gives `text`.
pub fn split(text: &str) -> Vec<Piece<'_>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut pieces = Vec::new();
    let mut start = 0; // byte offset of the current piece
    let mut start_line = 1;
    let mut line_no = 1;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if is_marker(line) && offset > start {
            pieces.push(make_piece(&text[start..offset], start_line));
            start = offset;
            start_line = line_no;
        }
        offset += line.len();
        line_no += 1;
        if is_end(line) {
            pieces.push(make_piece(&text[start..offset], start_line));
            start = offset;
            start_line = line_no;
        }
    }
    if offset > start {
        pieces.push(make_piece(&text[start..offset], start_line));
    }
    pieces
}

fn make_piece(text: &str, first_line: usize) -> Piece<'_> {
    let has_marker = text.split_inclusive('\n').next().is_some_and(is_marker);
    let has_content = text
        .split_inclusive('\n')
        .any(|l| !is_blank_or_comment(l) && !is_end(l));
    Piece {
        text,
        first_line,
        has_marker,
        is_document: has_marker || has_content,
    }
}

/// The comment block before a document's content (after its `---` line), and the one after
/// its content: kept around a document that is rewritten. Only column-0 comments count at
/// the end, since an indented `#` line there may be the tail of a block scalar.
pub fn surrounding_comments(piece: &Piece<'_>) -> (String, String) {
    let lines: Vec<&str> = piece.text.split_inclusive('\n').collect();
    let body = if piece.has_marker {
        &lines[1..]
    } else {
        &lines[..]
    };
    let lead: String = body
        .iter()
        .take_while(|l| is_blank_or_comment(l))
        .copied()
        .collect();
    let lead_len = body.iter().take_while(|l| is_blank_or_comment(l)).count();
    let rest = &body[lead_len..];
    let mut tail_start = rest.len();
    while tail_start > 0 {
        let l = rest[tail_start - 1];
        if l.trim().is_empty() || l.starts_with('#') || is_end(l) {
            tail_start -= 1;
        } else {
            break;
        }
    }
    let tail_lines = &rest[tail_start..];
    let tail = if tail_lines.iter().any(|l| l.starts_with('#')) {
        let mut t: String = tail_lines.iter().filter(|l| !is_end(l)).copied().collect();
        if !t.ends_with('\n') {
            t.push('\n');
        }
        t
    } else {
        String::new()
    };
    let mut lead = lead;
    if !lead.is_empty() && !lead.ends_with('\n') {
        lead.push('\n');
    }
    (lead, tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(input: &str) -> Vec<&str> {
        split(input).into_iter().map(|p| p.text).collect()
    }

    #[test]
    fn concatenation_gives_the_input_back() {
        for input in [
            "",
            "a: 1\n",
            "a: 1",
            "---\na: 1\n---\nb: 2\n",
            "# head\n---\na: 1\n...\n---\nb: |\n  x\n  --- not a marker\n",
            "a: 1\n---\n",
            "--- # c\na: 1\n---\n\n",
        ] {
            assert_eq!(texts(input).concat(), input, "{input:?}");
        }
    }

    #[test]
    fn documents_and_prelude() {
        let p = split("# only a comment\n---\na: 1\n---\nb: 2\n");
        assert_eq!(p.len(), 3);
        assert!(!p[0].is_document);
        assert!(p[1].is_document && p[1].has_marker && p[1].first_line == 2);
        assert_eq!(p[2].first_line, 4);
        let p = split("a: 1\n---\nb: 2\n");
        assert_eq!(p.len(), 2);
        assert!(p[0].is_document && !p[0].has_marker);
        // `----` and `---x` are not markers.
        assert_eq!(split("a: |\n  ----\n---x: 1\n").len(), 1);
    }

    #[test]
    fn comments_around_a_document() {
        let p = split("---\n# lead\n\napiVersion: v1\nkind: Pod\n# tail\n");
        let (lead, tail) = surrounding_comments(&p[0]);
        assert_eq!(lead, "# lead\n\n");
        assert_eq!(tail, "# tail\n");
        let p = split("a: |\n  x\n  # part of the scalar\n");
        assert_eq!(surrounding_comments(&p[0]), (String::new(), String::new()));
    }
}
