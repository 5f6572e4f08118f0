//! The BPE model: one pre-tokenised word in, token ids out, exactly as Hugging Face
//! `tokenizers`' `BPE` model does it.
//!
//! A word starts as one symbol per character (each looked up in the vocabulary; a character
//! missing from it becomes its `<0xXX>` byte tokens under `byte_fallback`, else the unknown
//! token, else nothing). Then the adjacent pair with the lowest merge rank is merged, leftmost
//! first among equal ranks, until no pair has a merge. Both byte-level vocabularies (ranked
//! merges as trained) and SentencePiece ones (merges ranked by the merged piece's score, see
//! `spm.rs`) run through this one algorithm. Encodings of words are cached: natural text repeats
//! its words, and the cache makes encoding a long text cost little more than pre-tokenising it.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;

use crate::error::{Result, RuntimeError};

/// Words at least this long (in bytes) are encoded without touching the cache, as in
/// Hugging Face's BPE: long words rarely repeat and would crowd the cache.
const CACHE_MAX_WORD_BYTES: usize = 256;
/// The cache is emptied when it holds this many words, which bounds its memory (about 10 MB).
const CACHE_CAPACITY: usize = 100_000;
/// Largest token id accepted from a vocabulary: ids index dense tables, and real vocabularies
/// stay far below this (the largest have about 260 000 entries); it bounds the id table at ~100 MB.
pub(crate) const MAX_TOKEN_ID: u32 = 1 << 22;

/// A small multiplicative hasher for the merge table's `(u32, u32)` keys, which are looked up
/// once per candidate pair: SipHash would dominate the merge loop.
#[derive(Default, Clone, Copy)]
pub(crate) struct PairHasher(u64);

impl Hasher for PairHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type PairMap = HashMap<(u32, u32), (u32, u32), BuildHasherDefault<PairHasher>>;

/// A BPE model's settings and tables (the fields of tokenizer.json's `"model"`).
pub(crate) struct Bpe {
    pub vocab: HashMap<String, u32>,
    /// Merges in rank order, as written in tokenizer.json.
    pub merges: Vec<(String, String)>,
    pub unk_token: Option<String>,
    pub continuing_subword_prefix: Option<String>,
    pub end_of_word_suffix: Option<String>,
    pub fuse_unk: bool,
    pub byte_fallback: bool,
    pub ignore_merges: bool,
    /// `(left id, right id)` → `(rank, merged id)`.
    pair_ranks: PairMap,
    /// The `<0xXX>` token of each byte, where the vocabulary has it.
    byte_ids: [Option<u32>; 256],
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

/// The settings of a BPE model other than its vocabulary and merges.
#[derive(Clone, Debug, Default)]
pub(crate) struct BpeOptions {
    pub unk_token: Option<String>,
    pub continuing_subword_prefix: Option<String>,
    pub end_of_word_suffix: Option<String>,
    pub fuse_unk: bool,
    pub byte_fallback: bool,
    pub ignore_merges: bool,
}

impl Clone for Bpe {
    fn clone(&self) -> Self {
        Bpe {
            vocab: self.vocab.clone(),
            merges: self.merges.clone(),
            unk_token: self.unk_token.clone(),
            continuing_subword_prefix: self.continuing_subword_prefix.clone(),
            end_of_word_suffix: self.end_of_word_suffix.clone(),
            fuse_unk: self.fuse_unk,
            byte_fallback: self.byte_fallback,
            ignore_merges: self.ignore_merges,
            pair_ranks: self.pair_ranks.clone(),
            byte_ids: self.byte_ids,
            cache: Mutex::new(HashMap::new()),
        }
    }
}

impl std::fmt::Debug for Bpe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bpe")
            .field("vocab", &self.vocab.len())
            .field("merges", &self.merges.len())
            .field("unk_token", &self.unk_token)
            .field("byte_fallback", &self.byte_fallback)
            .field("ignore_merges", &self.ignore_merges)
            .finish_non_exhaustive()
    }
}

/// One symbol of a word being merged: a doubly linked list over a vector, as in HF's `Word`.
#[derive(Clone, Copy)]
struct Symbol {
    id: u32,
    prev: usize,
    next: usize,
    alive: bool,
}

const NONE: usize = usize::MAX;

/// A candidate merge of the symbol at `pos` with its right neighbour.
#[derive(PartialEq, Eq)]
struct Candidate {
    rank: u32,
    pos: usize,
    new_id: u32,
}

impl Ord for Candidate {
    // BinaryHeap pops the greatest: make that the lowest rank, then the leftmost position.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .rank
            .cmp(&self.rank)
            .then_with(|| other.pos.cmp(&self.pos))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Bpe {
    /// Builds the model; a merge naming a token missing from the vocabulary is an error, as
    /// in Hugging Face.
    pub fn new(
        vocab: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        options: BpeOptions,
    ) -> Result<Bpe> {
        if let Some((token, &id)) = vocab.iter().find(|(_, &id)| id >= MAX_TOKEN_ID) {
            return Err(RuntimeError::Tokenizer(format!(
                "token {token:?} has id {id}, above the limit of {MAX_TOKEN_ID}"
            )));
        }
        let prefix_len = options
            .continuing_subword_prefix
            .as_ref()
            .map_or(0, String::len);
        let lookup = |t: &str| {
            vocab.get(t).copied().ok_or_else(|| {
                RuntimeError::Tokenizer(format!("merge uses {t:?}, which is not in the vocabulary"))
            })
        };
        let mut pair_ranks = PairMap::with_capacity_and_hasher(merges.len(), Default::default());
        for (rank, (a, b)) in merges.iter().enumerate() {
            let a_id = lookup(a)?;
            let b_id = lookup(b)?;
            let b_tail = b.get(prefix_len.min(b.len())..).unwrap_or("");
            let merged = format!("{a}{b_tail}");
            let new_id = lookup(&merged)?;
            let rank = u32::try_from(rank).unwrap_or(u32::MAX);
            pair_ranks.insert((a_id, b_id), (rank, new_id));
        }
        let mut byte_ids = [None; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = vocab.get(&format!("<0x{b:02X}>")).copied();
        }
        if let Some(unk) = &options.unk_token {
            if !vocab.contains_key(unk) {
                return Err(RuntimeError::Tokenizer(format!(
                    "the unknown token {unk:?} is not in the vocabulary"
                )));
            }
        }
        Ok(Bpe {
            vocab,
            merges,
            unk_token: options.unk_token,
            continuing_subword_prefix: options.continuing_subword_prefix,
            end_of_word_suffix: options.end_of_word_suffix,
            fuse_unk: options.fuse_unk,
            byte_fallback: options.byte_fallback,
            ignore_merges: options.ignore_merges,
            pair_ranks,
            byte_ids,
            cache: Mutex::new(HashMap::new()),
        })
    }

    pub fn options(&self) -> BpeOptions {
        BpeOptions {
            unk_token: self.unk_token.clone(),
            continuing_subword_prefix: self.continuing_subword_prefix.clone(),
            end_of_word_suffix: self.end_of_word_suffix.clone(),
            fuse_unk: self.fuse_unk,
            byte_fallback: self.byte_fallback,
            ignore_merges: self.ignore_merges,
        }
    }

    /// Appends the ids of one pre-tokenised word to `out`.
    pub fn tokenize(&self, word: &str, out: &mut Vec<u32>) {
        if word.is_empty() {
            return;
        }
        if self.ignore_merges {
            if let Some(&id) = self.vocab.get(word) {
                out.push(id);
                return;
            }
        }
        let cacheable = word.len() < CACHE_MAX_WORD_BYTES;
        if cacheable {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(ids) = cache.get(word) {
                out.extend_from_slice(ids);
                return;
            }
        }
        let start = out.len();
        self.merge_word(word, out);
        if cacheable {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
            cache.insert(word.to_owned(), out[start..].to_vec());
        }
    }

    fn initial_symbols(&self, word: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(word.len());
        let unk_id = self
            .unk_token
            .as_ref()
            .and_then(|u| self.vocab.get(u).copied());
        // A pending unknown run: fused runs of unknown characters make one unknown token.
        let mut pending_unk = false;
        let mut piece = String::new();
        let n_chars = word.chars().count();
        for (i, c) in word.chars().enumerate() {
            piece.clear();
            if i > 0 {
                if let Some(prefix) = &self.continuing_subword_prefix {
                    piece.push_str(prefix);
                }
            }
            piece.push(c);
            if i + 1 == n_chars {
                if let Some(suffix) = &self.end_of_word_suffix {
                    piece.push_str(suffix);
                }
            }
            if let Some(&id) = self.vocab.get(piece.as_str()) {
                if pending_unk {
                    ids.extend(unk_id);
                    pending_unk = false;
                }
                ids.push(id);
                continue;
            }
            if self.byte_fallback {
                let bytes: Option<Vec<u32>> = piece
                    .bytes()
                    .map(|b| self.byte_ids[usize::from(b)])
                    .collect();
                if let Some(bytes) = bytes {
                    // HF leaves a pending unknown run open across byte tokens.
                    ids.extend(bytes);
                    continue;
                }
            }
            if let Some(unk) = unk_id {
                if pending_unk && !self.fuse_unk {
                    ids.push(unk);
                }
                pending_unk = true;
            }
        }
        if pending_unk {
            ids.extend(unk_id);
        }
        ids
    }

    fn merge_word(&self, word: &str, out: &mut Vec<u32>) {
        let ids = self.initial_symbols(word);
        let n = ids.len();
        let mut symbols: Vec<Symbol> = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| Symbol {
                id,
                prev: if i == 0 { NONE } else { i - 1 },
                next: if i + 1 == n { NONE } else { i + 1 },
                alive: true,
            })
            .collect();
        let mut queue = BinaryHeap::with_capacity(n);
        for pos in 0..n.saturating_sub(1) {
            if let Some(&(rank, new_id)) = self.pair_ranks.get(&(ids[pos], ids[pos + 1])) {
                queue.push(Candidate { rank, pos, new_id });
            }
        }
        while let Some(top) = queue.pop() {
            let cur = symbols[top.pos];
            if !cur.alive || cur.next == NONE {
                continue;
            }
            let right = symbols[cur.next];
            // Skip a stale candidate: the pair at `pos` changed since it was queued.
            match self.pair_ranks.get(&(cur.id, right.id)) {
                Some(&(_, new_id)) if new_id == top.new_id => {}
                _ => continue,
            }
            symbols[top.pos].id = top.new_id;
            symbols[top.pos].next = right.next;
            symbols[cur.next].alive = false;
            if right.next != NONE {
                symbols[right.next].prev = top.pos;
            }
            let merged = symbols[top.pos];
            if merged.prev != NONE {
                let prev = symbols[merged.prev];
                if let Some(&(rank, new_id)) = self.pair_ranks.get(&(prev.id, merged.id)) {
                    queue.push(Candidate {
                        rank,
                        pos: merged.prev,
                        new_id,
                    });
                }
            }
            if merged.next != NONE {
                let next = symbols[merged.next];
                if let Some(&(rank, new_id)) = self.pair_ranks.get(&(merged.id, next.id)) {
                    queue.push(Candidate {
                        rank,
                        pos: top.pos,
                        new_id,
                    });
                }
            }
        }
        out.extend(symbols.iter().filter(|s| s.alive).map(|s| s.id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(vocab: &[&str], merges: &[(&str, &str)], options: BpeOptions) -> Bpe {
        let vocab = vocab
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let merges = merges
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        Bpe::new(vocab, merges, options).unwrap()
    }

    fn ids(m: &Bpe, word: &str) -> Vec<u32> {
        let mut out = vec![];
        m.tokenize(word, &mut out);
        out
    }

    #[test]
    fn merges_lowest_rank_first_then_leftmost() {
        // a b c ab bc abc: "abc" merges (b,c) first (rank 0), then (a,bc).
        let m = model(
            &["a", "b", "c", "ab", "bc", "abc"],
            &[("b", "c"), ("a", "b"), ("a", "bc")],
            BpeOptions::default(),
        );
        assert_eq!(ids(&m, "abc"), vec![5]);
        assert_eq!(ids(&m, "ab"), vec![3]);
        // Equal ranks: "aaa" with (a,a) merges the leftmost pair.
        let m = model(&["a", "aa"], &[("a", "a")], BpeOptions::default());
        assert_eq!(ids(&m, "aaa"), vec![1, 0]);
        assert_eq!(ids(&m, "aaaa"), vec![1, 1]);
    }

    #[test]
    fn unknown_characters_fall_back_to_bytes_or_unk() {
        let mut vocab: Vec<String> = vec!["<unk>".into(), "a".into()];
        vocab.extend((0..=255).map(|b| format!("<0x{b:02X}>")));
        let vocab_refs: Vec<&str> = vocab.iter().map(String::as_str).collect();
        let options = BpeOptions {
            byte_fallback: true,
            unk_token: Some("<unk>".into()),
            fuse_unk: true,
            ..Default::default()
        };
        let m = model(&vocab_refs, &[], options);
        // é is C3 A9.
        assert_eq!(ids(&m, "aé"), vec![1, 2 + 0xC3, 2 + 0xA9]);
        let options = BpeOptions {
            unk_token: Some("<unk>".into()),
            fuse_unk: true,
            ..Default::default()
        };
        let m = model(&["<unk>", "a"], &[], options);
        assert_eq!(ids(&m, "éüa€"), vec![0, 1, 0]);
        let m = model(
            &["<unk>", "a"],
            &[],
            BpeOptions {
                unk_token: Some("<unk>".into()),
                ..Default::default()
            },
        );
        assert_eq!(ids(&m, "éüa"), vec![0, 0, 1]);
        // No unknown token: the character is dropped, as in HF.
        let m = model(&["a"], &[], BpeOptions::default());
        assert_eq!(ids(&m, "éa"), vec![0]);
    }

    #[test]
    fn bad_merges_are_errors() {
        let vocab: HashMap<String, u32> = [("a".to_string(), 0), ("b".to_string(), 1)].into();
        let err =
            Bpe::new(vocab, vec![("a".into(), "b".into())], BpeOptions::default()).unwrap_err();
        assert!(err.to_string().contains("\"ab\""), "{err}");
    }
}
