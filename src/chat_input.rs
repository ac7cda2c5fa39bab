//! One chat turn read from line-based input. A turn may span lines, since code is what
//! people paste into a coder model: `"""` opens and closes a block kept as typed (as
//! Ollama does), and a line ending in `\` goes on to the next (as llama.cpp does).

use std::io::{self, BufRead};

/// Opens and closes a multi-line block.
const FENCE: &str = "\"\"\"";

/// Reads the next turn, calling `prompt(continuing)` before each line. None at the end
/// of the input; a block left open there is still a turn. A one-line turn is trimmed
/// (commands like `/quit` are matched on it); a block keeps its indentation and inner
/// blank lines and loses only the blank lines around it.
pub(crate) fn read_turn(
    input: &mut impl BufRead,
    mut prompt: impl FnMut(bool) -> io::Result<()>,
) -> io::Result<Option<String>> {
    let mut line = String::new();
    prompt(false)?;
    if input.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let first = line.trim_end_matches(['\n', '\r']);
    if let Some(rest) = first.trim_start().strip_prefix(FENCE) {
        if let Some(body) = rest.strip_suffix(FENCE) {
            return Ok(Some(block(body)));
        }
        let mut text = rest.to_string();
        loop {
            prompt(true)?;
            line.clear();
            if input.read_line(&mut line)? == 0 {
                return Ok(Some(block(&text)));
            }
            let l = line.trim_end_matches(['\n', '\r']);
            text.push('\n');
            if let Some(last) = l.trim_end().strip_suffix(FENCE) {
                text.push_str(last);
                return Ok(Some(block(&text)));
            }
            text.push_str(l);
        }
    }
    let mut text = String::new();
    let mut l = first.to_string();
    while let Some(head) = l.strip_suffix('\\') {
        text.push_str(head);
        text.push('\n');
        prompt(true)?;
        line.clear();
        if input.read_line(&mut line)? == 0 {
            return Ok(Some(text.trim().to_string()));
        }
        l = line.trim_end_matches(['\n', '\r']).to_string();
    }
    text.push_str(&l);
    Ok(Some(text.trim().to_string()))
}

/// A turn that looks like a command (`/` and a word, like a mistyped `/exti`) and so is
/// refused rather than sent to the model when it is not a known one, as Ollama does;
/// `/usr/bin is slow` or a lone `/` still go through as messages.
pub(crate) fn is_command_word(turn: &str) -> bool {
    turn.strip_prefix('/')
        .is_some_and(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_alphabetic()))
}

/// A block's text without the blank lines around it (its indentation stays).
fn block(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let first = lines.iter().position(|l| !l.trim().is_empty());
    let last = lines.iter().rposition(|l| !l.trim().is_empty());
    match (first, last) {
        (Some(a), Some(b)) => lines[a..=b].join("\n").trim_end().to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every turn of `input`, and how many continuation prompts were shown.
    fn turns(input: &str) -> (Vec<String>, usize) {
        let mut r = io::Cursor::new(input.as_bytes().to_vec());
        let (mut out, mut more) = (Vec::new(), 0);
        while let Some(t) = read_turn(&mut r, |c| {
            more += c as usize;
            Ok(())
        })
        .expect("read")
        {
            out.push(t);
        }
        (out, more)
    }

    #[test]
    fn one_line_a_turn_trimmed() {
        let (t, more) = turns("  hello  \n/quit\r\n");
        assert_eq!(t, ["hello", "/quit"]);
        assert_eq!(more, 0);
    }

    #[test]
    fn a_fenced_block_keeps_indentation_and_inner_blank_lines() {
        let (t, more) = turns("\"\"\"\nfix this:\n\ndef f(x):\n    return x\n\"\"\"\nnext\n");
        assert_eq!(t, ["fix this:\n\ndef f(x):\n    return x", "next"]);
        assert_eq!(more, 5);
    }

    #[test]
    fn fences_may_share_a_line_with_text() {
        let (t, _) = turns("\"\"\"why does\n  this fail?\"\"\"\n\"\"\"one line\"\"\"\n");
        assert_eq!(t, ["why does\n  this fail?", "one line"]);
    }

    #[test]
    fn a_block_left_open_at_the_end_is_still_a_turn() {
        let (t, _) = turns("\"\"\"\nfn main() {}\n");
        assert_eq!(t, ["fn main() {}"]);
    }

    #[test]
    fn a_trailing_backslash_continues_the_line() {
        let (t, more) = turns("first \\\nsecond\\\nthird\nalone\n");
        assert_eq!(t, ["first \nsecond\nthird", "alone"]);
        assert_eq!(more, 2);
        let (t, _) = turns("dangling\\");
        assert_eq!(t, ["dangling"]);
    }

    #[test]
    fn empty_lines_are_empty_turns_and_the_end_is_none() {
        let (t, _) = turns("\n\"\"\"\n\n\"\"\"\n");
        assert_eq!(t, ["", ""]);
        assert!(turns("").0.is_empty());
    }

    #[test]
    fn only_a_slash_and_one_word_is_a_command() {
        for cmd in ["/quit", "/exti", "/Help"] {
            assert!(is_command_word(cmd), "{cmd}");
        }
        for msg in [
            "/",
            "/usr/bin is slow",
            "/etc/hosts",
            "/2",
            "hello /quit",
            "quit",
        ] {
            assert!(!is_command_word(msg), "{msg}");
        }
    }
}
