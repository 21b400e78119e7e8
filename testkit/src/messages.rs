//! Sample mails for delivery tests.

/// A plain mail with an RFC 2047 subject and sender.
pub fn simple(n: usize) -> Vec<u8> {
    format!(
        "From: =?utf-8?q?J=C3=BCrgen?= <juergen@example.net>\r\n\
         To: alice@example.com\r\n\
         Subject: Test =?utf-8?q?p=C3=A4iv=C3=A4=C3=A4?= {n}\r\n\
         Message-ID: <m{n}@example.net>\r\n\
         Date: Tue, 24 Nov 2026 10:00:00 +0000\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n\
         Hello Alice, this is message number {n}.\r\n\
         > quoted line\r\n\
         Bye.\r\n"
    )
    .into_bytes()
}

/// Broken encoded-words, 8-bit garbage in headers and body.
pub fn bad_encoded_words() -> Vec<u8> {
    let mut m = b"From: =?utf-8?q?=FF=FE?= <x@example.net>\r\nSubject: =?bogus?x?abc?= =?utf-8?b?!!!?= \xff\xfe\xc3(\r\n".to_vec();
    m.extend_from_slice(
        b"To: alice@example.com\r\n\r\nbody with \xff\xfe garbage and \x00 NUL\r\n",
    );
    m
}

/// No From header at all.
pub fn missing_from() -> Vec<u8> {
    b"To: alice@example.com\r\nSubject: no sender\r\n\r\nbody\r\n".to_vec()
}

/// A folded, one-megabyte Subject header.
pub fn huge_subject() -> Vec<u8> {
    let mut m = b"From: big@example.net\r\nSubject: ".to_vec();
    for _ in 0..(1024 * 1024 / 64) {
        m.extend_from_slice(&[b'x'; 62]);
        m.extend_from_slice(b"\r\n ");
    }
    m.extend_from_slice(b"end\r\n\r\nbody\r\n");
    m
}

/// Folded headers, HTML-only body, quoted-printable.
pub fn folded_html() -> Vec<u8> {
    b"From: \"Carol Example\"\r\n <carol@example.net>\r\nSubject: a folded\r\n\tsubject line\r\nMIME-Version: 1.0\r\nContent-Type: text/html; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n<html><body><p>Gr=FC=DFe aus <b>K=F6ln</b></p></body></html>\r\n".to_vec()
}

/// multipart/alternative with a text part and an HTML part.
pub fn multipart() -> Vec<u8> {
    b"From: dave@example.net\r\nSubject: =?ISO-8859-1?B?SWYgeW91IGNhbiByZWFkIHRoaXMgeW8=?=\r\nMIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=XX\r\n\r\n--XX\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nPlain   part\r\n   with spaces\r\n--XX\r\nContent-Type: text/html\r\n\r\n<p>html part</p>\r\n--XX--\r\n".to_vec()
}

/// `depth` nested multipart/mixed parts around one text part.
pub fn deep_multipart(depth: usize) -> Vec<u8> {
    let mut m = b"From: deep@example.net\r\nSubject: deep\r\nMIME-Version: 1.0\r\n".to_vec();
    for level in 0..depth {
        m.extend_from_slice(
            format!("Content-Type: multipart/mixed; boundary=b{level}\r\n\r\n--b{level}\r\n")
                .as_bytes(),
        );
    }
    m.extend_from_slice(b"Content-Type: text/plain\r\n\r\ninnermost\r\n");
    for level in (0..depth).rev() {
        m.extend_from_slice(format!("--b{level}--\r\n").as_bytes());
    }
    m
}

/// The well-formed and malformed samples above, as a seed set for mutation.
pub fn samples() -> Vec<Vec<u8>> {
    vec![
        simple(1),
        bad_encoded_words(),
        missing_from(),
        folded_html(),
        multipart(),
    ]
}

/// A mutation of one of [`samples`], chosen by `rng`: cut short, 8-bit garbage or NULs
/// spliced in, encoded-words broken, the header/body separator or every header gone,
/// line ends mixed, and now and then a 1 MB header or 5000-deep MIME nesting.
pub fn mutated(rng: &mut fastrand::Rng) -> Vec<u8> {
    let samples = samples();
    let mut m = samples[rng.usize(..samples.len())].clone();
    let mutations = 1 + rng.usize(..3);
    for _ in 0..mutations {
        let at = rng.usize(..=m.len());
        match rng.u8(..10) {
            0 => m.truncate(at),
            1 => {
                let garbage: Vec<u8> = (0..1 + rng.usize(..64)).map(|_| rng.u8(128..)).collect();
                m.splice(at..at, garbage);
            }
            2 => {
                m.splice(at..at, std::iter::repeat_n(0u8, 1 + rng.usize(..8)));
            }
            3 => {
                m.splice(at..at, b"=?utf-8?q?=XY=?= =?x?b?####?=".iter().copied());
            }
            4 => {
                if let Some(end) = m.windows(4).position(|w| w == b"\r\n\r\n") {
                    m.drain(end..end + 2);
                }
            }
            5 => {
                if let Some(end) = m.windows(4).position(|w| w == b"\r\n\r\n") {
                    m.drain(..end + 4);
                }
            }
            6 => {
                for b in m.iter_mut() {
                    if *b == b'\r' && rng.bool() {
                        *b = b' ';
                    }
                }
            }
            7 => {
                let random: Vec<u8> = (0..1 + rng.usize(..32)).map(|_| rng.u8(..)).collect();
                m.splice(at..at, random);
            }
            8 if rng.u8(..20) == 0 => m = huge_subject(),
            9 if rng.u8(..20) == 0 => m = deep_multipart(5000),
            _ => {}
        }
    }
    m
}
