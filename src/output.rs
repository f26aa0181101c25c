//! What commands print: results on stdout (a table, or JSON with `--json`), everything else on
//! stderr, nothing on stderr under `-q` but errors.

use std::io::Write;

use serde::Serialize;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Output {
    pub(crate) json: bool,
    pub(crate) quiet: bool,
}

impl Output {
    /// A progress or status note for a person.
    pub(crate) fn note(&self, message: impl std::fmt::Display) {
        if !self.quiet {
            eprintln!("{message}");
        }
    }

    /// One JSON value on one line of stdout.
    pub(crate) fn json_line(&self, value: &impl Serialize) {
        if let Ok(line) = serde_json::to_string(value) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }

    /// The result of a command: JSON with `--json`, else the text.
    pub(crate) fn result(&self, value: &impl Serialize, text: impl FnOnce() -> String) {
        if self.json {
            self.json_line(value);
        } else {
            let text = text();
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "{text}");
            if !text.is_empty() && !text.ends_with('\n') {
                let _ = writeln!(out);
            }
            let _ = out.flush();
        }
    }
}

/// Left-aligned columns separated by two spaces.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                s.push_str(cell);
                s.push_str(&" ".repeat(pad + 2));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let t = table(
            &["NODE", "STATE"],
            &[
                vec!["local".into(), "running".into()],
                vec!["gpu-lab-1".into(), "stopped".into()],
            ],
        );
        assert_eq!(
            t,
            "NODE       STATE\nlocal      running\ngpu-lab-1  stopped\n"
        );
    }
}
