//! GPT-2's byte ↔ character table.
//!
//! Byte-level BPE vocabularies (GPT-2, SmolLM2, LLaMA-3, Qwen2, …) are written over 256
//! printable characters, one per byte: the bytes that are already printable and not blank
//! (`!`..=`~`, `¡`..=`¬`, `®`..=`ÿ`) stand for themselves, and the other 68 are shifted to
//! U+0100 and up in byte order (so a space is `Ġ`, a newline `Ċ`). Encoding maps every byte of
//! a pre-tokenised word through this table before BPE; decoding maps back.

use std::sync::OnceLock;

/// Every character of the table lies below this code point (U+0100 + 68 shifted bytes).
const TABLE_CHAR_LIMIT: usize = 0x200;

struct ByteTable {
    byte_to_char: [char; 256],
    /// Indexed by code point; `-1` for characters outside the table.
    char_to_byte: [i16; TABLE_CHAR_LIMIT],
}

fn table() -> &'static ByteTable {
    static TABLE: OnceLock<ByteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let mut byte_to_char = ['\0'; 256];
        let mut char_to_byte = [-1i16; TABLE_CHAR_LIMIT];
        let mut shifted = 0u32;
        for b in 0..=255u8 {
            let code = if printable(b) {
                u32::from(b)
            } else {
                shifted += 1;
                0x100 + shifted - 1
            };
            // Every code point here is below 0x200, so it is a valid char.
            let c = char::from_u32(code).unwrap_or('\u{FFFD}');
            byte_to_char[usize::from(b)] = c;
            char_to_byte[code as usize] = i16::from(b);
        }
        ByteTable {
            byte_to_char,
            char_to_byte,
        }
    })
}

/// The character that stands for byte `b`.
pub(crate) fn byte_char(b: u8) -> char {
    table().byte_to_char[usize::from(b)]
}

/// The byte that character `c` stands for, if `c` is in the table.
pub(crate) fn char_byte(c: char) -> Option<u8> {
    let i = c as usize;
    if i < TABLE_CHAR_LIMIT {
        u8::try_from(table().char_to_byte[i]).ok()
    } else {
        None
    }
}

/// `s`'s UTF-8 bytes, each written as its table character.
pub(crate) fn encode_bytes(s: &str) -> String {
    s.bytes().map(byte_char).collect()
}

/// The bytes a byte-level token stands for. As Hugging Face's ByteLevel decoder does, a token
/// with any character outside the table (an added token such as `"\n\n"`) is taken verbatim.
pub(crate) fn token_bytes(token: &str, out: &mut Vec<u8>) {
    let start = out.len();
    for c in token.chars() {
        match char_byte(c) {
            Some(b) => out.push(b),
            None => {
                out.truncate(start);
                out.extend_from_slice(token.as_bytes());
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_a_bijection_with_gpt2_anchors() {
        assert_eq!(byte_char(b' '), 'Ġ');
        assert_eq!(byte_char(b'\n'), 'Ċ');
        assert_eq!(byte_char(b'a'), 'a');
        assert_eq!(byte_char(0xAD), 'Ń');
        for b in 0..=255u8 {
            assert_eq!(char_byte(byte_char(b)), Some(b));
        }
        assert_eq!(char_byte('€'), None);
    }
}
