//! Quoting a caller's value back in an error message, bounded.
//!
//! Error messages say what was wrong, which often means quoting the bad
//! value. A value can be megabytes long (a name, a tag, a selector), and an
//! error that echoes it in full multiplies the cost of a bad request and
//! floods logs. Every message that quotes a caller's value goes through
//! [`quote`].

/// The most bytes of a caller's value an error message quotes.
pub const QUOTE_LIMIT: usize = 200;

/// `value` as an error message quotes it: Rust-debug quoted (so control
/// characters show), cut to at most [`QUOTE_LIMIT`] bytes of the value on a
/// character boundary, with `…` after the quote when it was cut.
pub fn quote(value: &str) -> String {
    let (shown, cut) = clip(value, QUOTE_LIMIT);
    if cut { format!("{shown:?}… ({} bytes)", value.len()) } else { format!("{shown:?}") }
}

/// The longest prefix of `text` of at most `limit` bytes that ends on a
/// character boundary, and whether anything was cut.
pub fn clip(text: &str, limit: usize) -> (&str, bool) {
    if text.len() <= limit {
        return (text, false);
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (&text[..end], true)
}

/// The most bytes of a library's message (a JSON parser's rejection) that an
/// error repeats: room for the message around a quoted value.
pub const MESSAGE_LIMIT: usize = 2 * QUOTE_LIMIT;

/// `text` cut to at most [`MESSAGE_LIMIT`] bytes on a character boundary,
/// with `…` when it was cut: for messages made by a library that may quote
/// the caller's input themselves.
pub fn clip_message(text: &str) -> String {
    match clip(text, MESSAGE_LIMIT) {
        (shown, true) => format!("{shown}…"),
        (shown, false) => shown.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_quoted_whole() {
        assert_eq!(quote("digits"), "\"digits\"");
        assert_eq!(quote("a\nb"), "\"a\\nb\"");
    }

    #[test]
    fn long_values_are_cut_on_a_char_boundary() {
        let long = "é".repeat(1_000_000);
        let q = quote(&long);
        assert!(q.len() < QUOTE_LIMIT + 40, "{} bytes", q.len());
        assert!(q.ends_with("… (2000000 bytes)"), "{q}");
        assert!(q.starts_with("\"éé"));
        let m = clip_message(&"x".repeat(5000));
        assert_eq!(m.len(), MESSAGE_LIMIT + "…".len());
    }
}
