#!/usr/bin/env python3
"""Reference tokenizer fixtures for runtime/tests/tokenizer.rs, made with Hugging Face `tokenizers`.

Run (from the repository root; deterministic, so re-running rewrites identical files):

    python3 -m venv ~/.cache/egret/tokvenv
    ~/.cache/egret/tokvenv/bin/pip install tokenizers gguf sentencepiece numpy
    ~/.cache/egret/tokvenv/bin/python tools/make_tokenizer_fixtures.py \
        [--gguf $HOME/.cache/egret/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf] [--out tests/fixtures/tokenizer]

It writes, under --out:

- smollm2.cases.json: SmolLM2's tokenizer rebuilt in `tokenizers` from the GGUF's vocabulary and
  merges, configured as SmolLM2's real tokenizer.json (BPE; pre-tokenizer
  Sequence[Digits(individual_digits), ByteLevel(add_prefix_space=False, use_regex=True)];
  ByteLevel decoder; the control tokens as special added tokens). Its tokenizer.json (~2 MB) is
  not written: the Rust test rebuilds it from the GGUF.
- spm_llama.{tokenizer,gguf,cases}.json: a small SentencePiece BPE vocabulary trained here on the
  corpus below, converted as `transformers`' LlamaConverter does (legacy: Prepend("▁") +
  Replace(" ", "▁") normalizer, byte fallback, merges from scores by `generate_merges`,
  TemplateProcessing "<s> $A"); merges written in the "a b" string form. `gguf.json` holds the
  same vocabulary as GGUF `tokenizer.ggml.*` metadata (tokens, scores, token_type).
- bpe_llama3.{tokenizer,gguf,cases}.json: a small byte-level BPE trained here with LLaMA-3's
  Split regex + ByteLevel(use_regex=False), ignore_merges, post-processor
  Sequence[ByteLevel, TemplateProcessing "<|begin_of_text|> $A"], plus two non-special added
  tokens with lstrip / single_word (merges in the [a, b] pair form). `gguf.json` is the same
  vocabulary as GGUF metadata with `pre = "llama-bpe"` (no lstrip/single_word tokens there, so
  its ids are the `ids_gguf` field, from a tokenizer without them).

- {spm_metaspace_first, spm_metaspace_always_split, bpe_misc, bpe_whitespace}.{tokenizer,cases}.json:
  the same vocabularies behind other parts, each checked against HF: Metaspace pre-tokenizer and
  decoder (prepend_scheme first / always, split); Strip, Lowercase, Replace(regex) and Prepend
  normalizers with Split behaviours (merged_with_previous, removed, contiguous, inverted
  merged_with_next), contiguous Digits and RobertaProcessing; Whitespace and WhitespaceSplit.

Each cases file: {"cases": [{"text", "ids" (no specials added), "ids_special" (add_special_tokens),
"decoded" (decode(ids), specials kept), "random"}]}, one case per line: hand-written strings (digits, punctuation
runs, scripts, emoji with ZWJ, whitespace runs, contractions, specials, the empty string, the
training corpus) and RANDOM_COUNT seeded random strings ("random": true; they may hold bytes a
vocabulary lacks, which HF drops, so they need not decode back to themselves).
"""

import argparse
import io
import json
import os
import random
import sys

import sentencepiece as spm
import tokenizers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Training text for the two small vocabularies: a few KB in several scripts.
CORPUS = """\
The capital of France is Paris. The capital of Germany is Berlin, and the capital of Italy is Rome.
It's a truth universally acknowledged that they're here, we'll see, you've been told, I'd say I'm fine.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000 2024 3.14159 2.71828 1,000,000 -273.15 +12 0x7F 1e-9.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!
def tokenize(text):
    words = text.split()
    return [w.lower() for w in words if w]  # a comment
for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }
Le café est très bon, à la française; l'été dernier, nous étions à Zürich et à São Paulo.
Die Straße ist lang und schön. Ärger, Öl, Übermut: große Wörter für kleine Dinge.
El niño comió una manzana. ¿Dónde está la biblioteca? ¡Qué día tan bonito!
Москва — столица России. Привет, как дела? Всё хорошо, спасибо.
Η Αθήνα είναι η πρωτεύουσα της Ελλάδας.
東京は日本の首都です。今日はいい天気ですね。
北京是中国的首都。我们今天去公园散步吧。
서울은 한국의 수도입니다. 안녕하세요!
مرحبا بكم في عالم اللغات. القاهرة عاصمة مصر.
שלום לכולם, ירושלים היא עיר עתיקה.
नमस्ते दुनिया, यह एक परीक्षण है।
Emoji are text too: 😀 😂 👍 🎉 ❤️ 🚀 and families like 👨‍👩‍👧 appear in chat logs.
Tabs\tand\tnewlines\nare whitespace; so are  double  spaces and trailing spaces   
Punctuation runs: !!! ??? ... --- *** ### @@ $$ %% && (( )) [[ ]] {{ }} << >> ~~ `` '' ""
URLs like https://example.com/path?query=1&x=2#frag and emails like someone@example.org.
In 1969, Apollo 11 landed on the Moon; 384,400 km away, at 20:17 UTC on July 20.
She said: "Don't worry, it'll be OK." He replied, 'We've done this before.'
Machine learning models learn representations; tokenizers split text into subword units.
"""

CASES = [
    "",
    " ",
    "  ",
    "\n",
    "\t",
    "The capital of France is",
    "Hello world",
    " Hello world",
    "Hello world ",
    "   leading and trailing   ",
    "Hello   world\t\ttabs\n\nnewlines\r\nwindows\n \n  end",
    "I'm sure they're here; we'll see what you've done, I'd say it's John's. SHE'LL WE'RE I'M 'S",
    "1234567890 3.14159 1,000,000 -42 +7 0x1F 2024-06-01 12:30",
    "99999999999999999999999999999999",
    "!!!??? ... --- *** ### @@@ $$$ %%% ^^^ &&& ((())) [[[]]] {{{}}} <<<>>> ~~~ ``` ''' \"\"\"",
    "naïve café résumé façade Ångström Zürich São Paulo",
    "日本語のテキストと中文文本，还有한국어.",
    "مرحبا بالعالم",
    "שלום עולם",
    "Emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🤖🤖🤖🤖🤖",
    "Math: ∑ x² ≤ ∞, ½ + ¼ = ¾, Ⅻ, ٣٤٥, ๑๒๓",
    "def f(x):\n    return x**2  # square\n\tpass\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|endoftext|>more",
    "<|im_start|><|im_end|>",
    " <|im_end|> ",
    "<s>Hello</s>",
    "<s> [INST] hi [/INST]",
    "<unk> <sep> x",
    "<|begin_of_text|>Hi<|end_of_text|>",
    "a\u00a0b\u2009c\u3000d",
    "zero\u200bwidth\ufeffbom",
    "control\x00\x01\x1fchars\x7f",
    "   \n   \n",
    "ＦＵＬＬＷＩＤＴＨ ｆｕｌｌ",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "abc <mask> def  <mask>x xyz xyzabc (xyz) _xyz",
    CORPUS,
]

# Random strings (fixed seed) mixing scripts, marks, spaces, digits, contractions and specials.
RANDOM_SEED = 20240601
RANDOM_COUNT = 80
RANDOM_RANGES = [(0x20, 0x7E)] * 6 + [
    (0x00, 0x20), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
    (0x900, 0x97F), (0xE00, 0xE7F), (0x1100, 0x11FF), (0x2000, 0x206F), (0x2070, 0x218F),
    (0x2460, 0x24FF), (0x3000, 0x303F), (0x3040, 0x30FF), (0x4E00, 0x4F00), (0xAC00, 0xAD00),
    (0xFF00, 0xFFEF), (0x1F300, 0x1F6FF), (0x1F900, 0x1F9FF), (0x10000, 0x100FF), (0x1D400, 0x1D4FF),
]
RANDOM_WORDS = [
    "the", " the", "'s", "'S", "'ll", "'LL", "'re", "'ve", "'", "'m ", "x'S", " ", "  ", "   \n", "\n",
    "\n\n\n", "\t", "  \t ", "\r\n", "\u0085", "\x0b", "\x0c", "\u2028", "\u00a0\u00a0", " \u00a0",
    "123", "4567", "٣", "१२", "Ⅻ", "²", "<0x41>", "<0xE2>", "▁", "▁▁", "Ġ", "<|im_start|>",
    "<|im_end|>", "<s>", "</s>", "<mask>", "xyz", " xyz", "<|begin_of_text|>",
]


def random_texts():
    rng = random.Random(RANDOM_SEED)
    texts = []
    for _ in range(RANDOM_COUNT):
        out = []
        for _ in range(rng.randint(0, 40)):
            if rng.random() < 0.3:
                out.append(rng.choice(RANDOM_WORDS))
            else:
                a, b = rng.choice(RANDOM_RANGES)
                out.append(chr(rng.randint(a, b)))
        texts.append("".join(out))
    return texts


def cases_for(tok, texts, extra=None):
    out = []
    for i, text in enumerate(texts):
        ids = tok.encode(text, add_special_tokens=False).ids
        case = {
            "text": text,
            "ids": ids,
            "ids_special": tok.encode(text, add_special_tokens=True).ids,
            "decoded": tok.decode(ids, skip_special_tokens=False),
            "random": i >= len(CASES),
        }
        if extra is not None:
            case["ids_gguf"] = extra.encode(text, add_special_tokens=False).ids
        out.append(case)
    return out


def write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def write_cases(path, meta, cases):
    """`meta` plus "cases", one case per line, so that diffs of re-generated fixtures stay readable."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("{\n")
        for k in sorted(meta):
            f.write(f" {json.dumps(k)}: {json.dumps(meta[k], ensure_ascii=False)},\n")
        f.write(' "cases": [\n')
        f.write(",\n".join("  " + json.dumps(c, ensure_ascii=False, sort_keys=True) for c in cases))
        f.write("\n ]\n}\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes, {len(cases)} cases)")


def generate_merges(vocab, vocab_scores):
    """transformers.convert_slow_tokenizer.generate_merges, verbatim in behaviour."""
    reverse = vocab_scores is not None
    vocab_scores = dict(vocab_scores) if reverse else vocab
    merges = []
    for merge, piece_score in vocab_scores.items():
        local = []
        for index in range(1, len(merge)):
            piece_l, piece_r = merge[:index], merge[index:]
            if piece_l in vocab and piece_r in vocab:
                local.append((piece_l, piece_r, piece_score))
        local = sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges = sorted(merges, key=lambda val: (val[2], len(val[0]), len(val[1])), reverse=reverse)
    return [(val[0], val[1]) for val in merges]


def smollm2(gguf_path, out):
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)

    def field(name):
        return reader.fields[name].contents()

    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "smollm"
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    meta = {
        "source": os.path.basename(gguf_path),
        "tokenizers_version": tokenizers.__version__,
        "bos_token_id": int(field("tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(field("tokenizer.ggml.eos_token_id")),
        "vocab_size": len(tokens),
    }
    write_cases(os.path.join(out, "smollm2.cases.json"), meta, cases_for(tok, CASES + random_texts()))


SPM_USER_DEFINED = ["<sep>"]


def spm_llama(out):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=900,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=0.995,
        user_defined_symbols=SPM_USER_DEFINED,
        num_threads=1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    scores = [sp.get_score(i) for i in range(n)]

    def piece_type(i):
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if pieces[i] in SPM_USER_DEFINED:
            return 4
        if sp.is_unused(i):
            return 5
        if sp.is_byte(i):
            return 6
        return 1

    types = [piece_type(i) for i in range(n)]
    assert pieces[:3] == ["<unk>", "<s>", "</s>"], pieces[:3]

    # LlamaConverter (legacy): vocab_scores with the first three scored 0.
    vocab_scores = [(p, 0.0) for p in pieces[:3]] + list(zip(pieces[3:], scores[3:]))
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = generate_merges(vocab, vocab_scores)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in range(n) if types[i] in (2, 3)])
    tok.add_tokens([AddedToken(pieces[i], special=False, normalized=False) for i in range(n) if types[i] == 4])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )

    tj = json.loads(tok.to_str())
    tj["model"]["merges"] = [f"{a} {b}" for a, b in tj["model"]["merges"]]
    write_json(os.path.join(out, "spm_llama.tokenizer.json"), tj)
    gguf_meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": pieces,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }
    write_json(os.path.join(out, "spm_llama.gguf.json"), gguf_meta)
    cases = cases_for(tok, CASES + random_texts())
    # SentencePiece itself, for information: HF's conversion may differ from it in rare cases.
    differ = sum(1 for c in cases if sp.encode(c["text"]) != c["ids"])
    print(f"spm_llama: {n} pieces, {len(merges)} merges; sentencepiece differs from HF on {differ}/{len(cases)} cases")
    write_cases(os.path.join(out, "spm_llama.cases.json"), {"tokenizers_version": tokenizers.__version__}, cases)
    return tok


def bpe_llama3(out):
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>"]
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    trained.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    m = json.loads(trained.to_str())["model"]
    merges = [tuple(x) if isinstance(x, list) else tuple(x.split(" ")) for x in m["merges"]]

    def build(extras):
        tok = Tokenizer(models.BPE(vocab=m["vocab"], merges=merges, ignore_merges=True))
        tok.pre_tokenizer = pre
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
        if extras:
            tok.add_tokens(
                [
                    AddedToken("<mask>", lstrip=True, special=False, normalized=False),
                    AddedToken("xyz", single_word=True, special=False, normalized=True),
                ]
            )
        bos = m["vocab"]["<|begin_of_text|>"]
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single="<|begin_of_text|> $A",
                    pair="<|begin_of_text|> $A:0 <|begin_of_text|>:1 $B:1",
                    special_tokens=[("<|begin_of_text|>", bos)],
                ),
            ]
        )
        return tok

    tok = build(True)
    base = build(False)
    write_json(os.path.join(out, "bpe_llama3.tokenizer.json"), json.loads(tok.to_str()))
    id_to_token = {i: t for t, i in m["vocab"].items()}
    tokens = [id_to_token[i] for i in range(len(id_to_token))]
    gguf_meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in specials else 1 for t in tokens],
        "tokenizer.ggml.merges": [f"{a} {b}" for a, b in merges],
        "tokenizer.ggml.bos_token_id": m["vocab"]["<|begin_of_text|>"],
        "tokenizer.ggml.eos_token_id": m["vocab"]["<|end_of_text|>"],
        "tokenizer.ggml.add_bos_token": True,
    }
    write_json(os.path.join(out, "bpe_llama3.gguf.json"), gguf_meta)
    cases = cases_for(tok, CASES + random_texts(), extra=base)
    print(f"bpe_llama3: {len(tokens)} tokens, {len(merges)} merges")
    write_cases(os.path.join(out, "bpe_llama3.cases.json"), {"tokenizers_version": tokenizers.__version__}, cases)
    return base


def variants(out, spm_tok, bpe_tok):
    """The same two vocabularies behind other pipeline parts, to check each part against HF."""
    vocab_ids = bpe_tok.get_vocab()
    bos, eos = vocab_ids["<|begin_of_text|>"], vocab_ids["<|end_of_text|>"]

    def metaspace(scheme, split):
        tok = Tokenizer.from_str(spm_tok.to_str())
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=split)
        tok.decoder = decoders.Sequence(
            [decoders.Metaspace(replacement="▁", prepend_scheme=scheme, split=split), decoders.ByteFallback(), decoders.Fuse()]
        )
        return tok

    def misc():
        tok = Tokenizer.from_str(bpe_tok.to_str())
        tok.normalizer = normalizers.Sequence(
            [
                normalizers.Strip(left=True, right=False),
                normalizers.Lowercase(),
                normalizers.Replace(Regex(r"[0-9]{4,}"), "#"),
                normalizers.Prepend("> "),
            ]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split("-", behavior="merged_with_previous"),
                pre_tokenizers.Split(Regex(r"\s+"), behavior="removed"),
                pre_tokenizers.Digits(individual_digits=False),
                pre_tokenizers.Split(Regex(r"[.!?]"), behavior="contiguous"),
                pre_tokenizers.Split(Regex(r"[a-z]+"), behavior="merged_with_next", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=False),
            ]
        )
        tok.post_processor = processors.RobertaProcessing(("<|end_of_text|>", eos), ("<|begin_of_text|>", bos))
        return tok

    def whitespace():
        tok = Tokenizer.from_str(bpe_tok.to_str())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=True)]
        )
        tok.post_processor = None
        return tok

    for name, tok in [
        ("spm_metaspace_first", metaspace("first", False)),
        ("spm_metaspace_always_split", metaspace("always", True)),
        ("bpe_misc", misc()),
        ("bpe_whitespace", whitespace()),
    ]:
        write_json(os.path.join(out, f"{name}.tokenizer.json"), json.loads(tok.to_str()))
        meta = {"tokenizers_version": tokenizers.__version__}
        write_cases(os.path.join(out, f"{name}.cases.json"), meta, cases_for(tok, CASES))


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    default_gguf = os.environ.get("EGRET_SMOLLM2_GGUF") or os.path.expanduser(
        "~/.cache/egret/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=default_gguf, help="SmolLM2-135M-Instruct GGUF (see scripts/test.sh)")
    ap.add_argument("--out", default=os.path.join(root, "tests", "fixtures", "tokenizer"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not os.path.exists(args.gguf):
        sys.exit(f"{args.gguf} not found: run scripts/test.sh once to fetch SmolLM2, or pass --gguf")
    smollm2(args.gguf, args.out)
    spm_tok = spm_llama(args.out)
    bpe_tok = bpe_llama3(args.out)
    variants(args.out, spm_tok, bpe_tok)


if __name__ == "__main__":
    main()
