//! SentencePiece BPE vocabularies (GGUF `tokenizer.ggml.model = "llama"`) carry scores, not
//! merges. SentencePiece merges the adjacent pair whose merged piece has the highest score;
//! Hugging Face's `LlamaTokenizerFast` expresses the same thing as ranked merges, built by
//! `transformers`' `generate_merges`: every split of every piece into two vocabulary pieces
//! is a merge, ranked by the piece's score (highest first), then by the longer left part, then
//! the longer right part, with ties kept in vocabulary order. This file is that function, so
//! a GGUF LLaMA vocabulary runs through the same BPE model as a tokenizer.json and writes back
//! as one.

use std::collections::HashMap;

/// Ranked merges for a SentencePiece vocabulary. `vocab` maps each piece to its id (the last
/// id where a piece repeats, like a Python dict); `pieces` and `scores` are in id order.
pub(crate) fn merges_from_scores(
    pieces: &[String],
    scores: &[f32],
    vocab: &HashMap<String, u32>,
) -> Vec<(String, String)> {
    // Python's dict(vocab_scores): first position of each piece, last score.
    let mut first_seen: HashMap<&str, usize> = HashMap::with_capacity(pieces.len());
    let mut order: Vec<(&str, f32)> = Vec::with_capacity(pieces.len());
    for (piece, &score) in pieces.iter().zip(scores) {
        match first_seen.get(piece.as_str()) {
            Some(&i) => order[i].1 = score,
            None => {
                first_seen.insert(piece, order.len());
                order.push((piece, score));
            }
        }
    }
    // (left, right, score, left chars, right chars)
    let mut merges: Vec<(&str, &str, f32, usize, usize)> = Vec::new();
    let mut local = Vec::new();
    for &(piece, score) in &order {
        local.clear();
        let n_chars = piece.chars().count();
        for (k, (split, _)) in piece.char_indices().enumerate().skip(1) {
            let (l, r) = piece.split_at(split);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                local.push((li, ri, l, r, k, n_chars - k));
            }
        }
        local.sort_by_key(|&(li, ri, ..)| (li, ri));
        merges.extend(
            local
                .iter()
                .map(|&(_, _, l, r, lc, rc)| (l, r, score, lc, rc)),
        );
    }
    // sorted(key=(score, len(l), len(r)), reverse=True): stable, so ties keep their order.
    // total_cmp keeps the order total even for NaN scores (a corrupt file must not panic);
    // -0.0 is folded into 0.0 first, as Python compares them equal.
    let key = |s: f32| if s == 0.0 { 0.0 } else { s };
    merges.sort_by(|a, b| {
        key(b.2)
            .total_cmp(&key(a.2))
            .then(b.3.cmp(&a.3))
            .then(b.4.cmp(&a.4))
    });
    merges
        .into_iter()
        .map(|(l, r, ..)| (l.to_owned(), r.to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_follow_the_merged_piece_score() {
        let pieces: Vec<String> = ["<unk>", "▁", "a", "b", "ab", "▁ab", "▁a"]
            .map(String::from)
            .to_vec();
        let scores = [0.0, -1.0, -2.0, -3.0, -0.5, -0.7, -0.9];
        let vocab = pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (p.clone(), i as u32))
            .collect();
        let merges = merges_from_scores(&pieces, &scores, &vocab);
        let m: Vec<(&str, &str)> = merges
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        // "<unk>" has no split into two pieces; "▁ab" has two (by ids: ▁+ab, ▁a+b), ordered by
        // longer left first.
        assert_eq!(m, vec![("a", "b"), ("▁a", "b"), ("▁", "ab"), ("▁", "a")]);
    }
}
