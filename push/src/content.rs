//! Turning raw mail headers into display text, and cutting text so a payload fits its
//! size limit. RFC 2047 decoding is done by `mailparse`.

/// The sender's display name from a raw `From:` value: the decoded display name of the first
/// address, else the address itself, else the decoded raw value.
pub(crate) fn sender_display_name(raw_from: &str) -> String {
    let line = header_line("From", raw_from);
    let Ok((header, _)) = mailparse::parse_header(&line) else {
        return raw_from.trim().to_owned();
    };
    if let Ok(list) = mailparse::addrparse_header(&header) {
        for addr in list.iter() {
            match addr {
                mailparse::MailAddr::Single(info) => return single_name(info),
                mailparse::MailAddr::Group(group) => {
                    if let Some(first) = group.addrs.first() {
                        return single_name(first);
                    }
                    if !group.group_name.trim().is_empty() {
                        return group.group_name.trim().to_owned();
                    }
                }
            }
        }
    }
    header.get_value().trim().to_owned()
}

fn single_name(info: &mailparse::SingleInfo) -> String {
    match info.display_name.as_deref().map(str::trim) {
        Some(name) if !name.is_empty() => name.to_owned(),
        _ => info.addr.trim().to_owned(),
    }
}

/// A raw `Subject:` value with encoded words decoded and folding removed.
pub(crate) fn decode_subject(raw_subject: &str) -> String {
    let line = header_line("Subject", raw_subject);
    match mailparse::parse_header(&line) {
        Ok((header, _)) => header.get_value().trim().to_owned(),
        Err(_) => raw_subject.trim().to_owned(),
    }
}

fn header_line(name: &str, value: &str) -> Vec<u8> {
    // A bare LF or CR inside the value would end the header early; unfold it into a space.
    let value: String = value
        .chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect();
    format!("{name}: {value}\r\n").into_bytes()
}

const ELLIPSIS: char = '…';

/// Renders with `render` and, while the result is larger than `limit` bytes, shortens the
/// texts in order (the first is cut until empty before the second is touched), always at
/// character boundaries and marking a cut with `…`. Each text keeps the longest prefix that
/// fits (binary search, so a text rendered twice is not over-cut). `None` if it does not fit
/// even with every text empty.
pub(crate) fn fit_to_limit<F>(texts: &mut [String], limit: usize, mut render: F) -> Option<Vec<u8>>
where
    F: FnMut(&[String]) -> Vec<u8>,
{
    let bytes = render(texts);
    if bytes.len() <= limit {
        return Some(bytes);
    }
    for idx in 0..texts.len() {
        let original = std::mem::take(&mut texts[idx]);
        let emptied = render(texts);
        if emptied.len() > limit {
            continue;
        }
        // Cut points: every char boundary strictly inside the text. Invariant: the prefix
        // ending at `cuts[lo - 1]` fits (or lo == 0: the empty text fits), `cuts[hi]` doesn't.
        let cuts: Vec<usize> = original.char_indices().map(|(i, _)| i).skip(1).collect();
        let (mut lo, mut hi) = (0, cuts.len());
        let mut best = emptied;
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            texts[idx] = with_ellipsis(&original[..cuts[mid]]);
            let candidate = render(texts);
            if candidate.len() <= limit {
                best = candidate;
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        texts[idx] = if lo == 0 {
            String::new()
        } else {
            with_ellipsis(&original[..cuts[lo - 1]])
        };
        return Some(best);
    }
    None
}

fn with_ellipsis(prefix: &str) -> String {
    let prefix = prefix.trim_end();
    if prefix.is_empty() {
        return String::new();
    }
    let mut out = String::with_capacity(prefix.len() + ELLIPSIS.len_utf8());
    out.push_str(prefix);
    out.push(ELLIPSIS);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_display_names() {
        assert_eq!(
            sender_display_name("=?utf-8?q?=C3=84?= <alice@example.org>"),
            "Ä"
        );
        assert_eq!(
            sender_display_name("\"Doe, John\" <john@example.org>"),
            "Doe, John"
        );
        assert_eq!(sender_display_name("bob@example.org"), "bob@example.org");
        assert_eq!(
            sender_display_name("=?ISO-8859-1?Q?J=F6rg?= <j@example.org>"),
            "Jörg"
        );
        assert_eq!(sender_display_name(""), "");
    }

    #[test]
    fn decodes_subjects() {
        assert_eq!(
            decode_subject("Test =?utf-8?q?p=C3=A4iv=C3=A4=C3=A4?="),
            "Test päivää"
        );
        assert_eq!(decode_subject("=?UTF-8?B?8J+Ygg==?= hi"), "😂 hi");
        assert_eq!(decode_subject("plain\r\n folded"), "plain   folded".trim());
    }

    #[test]
    fn fits_at_char_boundaries() {
        let mut texts = vec!["é".repeat(100), "title".to_owned()];
        let out = fit_to_limit(&mut texts, 50, |t| {
            format!("[{}|{}]", t[0], t[1]).into_bytes()
        })
        .unwrap();
        assert!(out.len() <= 50);
        let s = String::from_utf8(out).unwrap();
        assert!(texts[0].ends_with('…'), "{s}");
        assert_eq!(texts[1], "title");
    }

    #[test]
    fn cuts_second_text_after_first_is_empty_and_gives_up_when_impossible() {
        let mut texts = vec!["aaaa".to_owned(), "bbbbbbbbbb".to_owned()];
        let out = fit_to_limit(&mut texts, 8, |t| format!("{}{}", t[0], t[1]).into_bytes());
        assert!(out.unwrap().len() <= 8);
        assert!(texts[0].is_empty());
        let mut texts = vec!["a".to_owned()];
        assert!(fit_to_limit(&mut texts, 3, |_| b"four".to_vec()).is_none());
    }
}
