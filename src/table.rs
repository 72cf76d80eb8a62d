//! Aligned text columns for people: `malai ssh status`, `cluster status`, and any other
//! report printed as a table (the audit view).
//!
//! One renderer, so every table looks the same: left-aligned columns two spaces apart,
//! widths counted in characters (a name may not be ASCII), no trailing spaces, one `\n` per
//! row. Machine-readable output is `--json`, never this.

/// A table being filled: a header row, then data rows.
#[derive(Debug, Clone, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

/// Space between two columns.
const GAP: &str = "  ";

impl Table {
    /// A table whose first row is `header`.
    pub fn new<S: Into<String>>(header: impl IntoIterator<Item = S>) -> Table {
        let mut t = Table::default();
        t.row(header);
        t
    }

    /// Adds a row; a row shorter than others is padded with empty cells. Control
    /// characters in a cell are shown escaped (`logging::printable`): cells often hold
    /// what peers said (reasons, names), and one row must stay one line on the terminal.
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows.push(
            cells
                .into_iter()
                .map(|c| {
                    let c: String = c.into();
                    crate::logging::printable(&c).into_owned()
                })
                .collect(),
        );
    }

    /// The table as text, one line per row.
    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0usize; columns];
        for r in &self.rows {
            for (w, cell) in widths.iter_mut().zip(r) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for r in &self.rows {
            let mut line = String::new();
            for (i, w) in widths.iter().enumerate() {
                let cell = r.get(i).map(String::as_str).unwrap_or("");
                if i > 0 {
                    line.push_str(GAP);
                }
                line.push_str(cell);
                let pad = w - cell.chars().count();
                line.extend(std::iter::repeat_n(' ', pad));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_lines_have_no_trailing_space() {
        let mut t = Table::new(["NAME", "KIND", "STATE"]);
        t.row(["foo", "server", "online"]);
        t.row(["alice-laptop", "device", ""]);
        let text = t.render();
        assert_eq!(
            text,
            "NAME          KIND    STATE\n\
             foo           server  online\n\
             alice-laptop  device\n"
        );
    }

    #[test]
    fn a_cell_with_control_characters_stays_on_its_row() {
        let mut t = Table::new(["NAME", "REASON"]);
        t.row(["foo", "refused\r\nFORGED\u{1b}[2J"]);
        let text = t.render();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
        assert!(text.contains("refused\\r\\nFORGED\\u{1b}[2J"), "{text}");
    }

    #[test]
    fn widths_count_characters_and_short_rows_are_padded() {
        let mut t = Table::new(["A", "B"]);
        t.row(["é", "x"]);
        t.row(["long"]);
        let lines: Vec<String> = t.render().lines().map(String::from).collect();
        assert_eq!(lines, vec!["A     B", "é     x", "long"]);
        assert_eq!(Table::default().render(), "");
    }
}
