"""Tokenizers: round trips, padding sides, truncation, special tokens, HF wrapper."""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from novarl_jax.rollout.tokenizers import ByteTokenizer, CharTokenizer, HFTokenizer, Tokenizer


def test_char_tokenizer_ids_and_round_trip():
    tok = CharTokenizer("0123456789+=")
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 15)
    assert tok.encode("1+2=") == [4, 13, 5, 14]
    assert tok.decode(tok.encode("12+3=")) == "12+3="
    # decode stops at eos and drops pad/bos
    assert tok.decode([1, 4, 0, 5, 2, 6]) == "12"
    assert tok.decode([4, 2, 5], stop_at_eos=False) == "12"
    assert isinstance(tok, Tokenizer)


def test_decode_refuses_negative_and_float_ids():
    # An HFTokenizer raised OverflowError for -1; a float id was truncated.
    tok = CharTokenizer("abc")
    assert tok.decode([3, 4, 99]) == "ab"  # ids past the alphabet (a larger model's) drop
    with pytest.raises(ValueError, match="ids must be token ids >= 0, got -1"):
        tok.decode([3, -1])
    with pytest.raises(TypeError, match="ids must be integer token ids, got dtype float64"):
        tok.decode([3.0, 4.5])


def test_char_tokenizer_errors():
    with pytest.raises(ValueError, match="character 'x' is not in the alphabet"):
        CharTokenizer("abc").encode("abx")
    with pytest.raises(ValueError, match="repeated characters"):
        CharTokenizer("aab")
    with pytest.raises(ValueError, match="alphabet must be a non-empty string"):
        CharTokenizer("")
    with pytest.raises(ValueError, match="truncation='middle' is not one of"):
        CharTokenizer("ab", truncation="middle")


def test_byte_tokenizer_round_trip_and_invalid_utf8():
    tok = ByteTokenizer()
    assert tok.vocab_size == 259
    assert tok.encode("hi") == [107, 108]
    assert tok.decode(tok.encode("héllo ✓")) == "héllo ✓"
    # A lone continuation byte decodes to the replacement character, never raises.
    assert tok.decode([0x80 + 3]) == "\ufffd"


@settings(max_examples=25, deadline=None)
@given(st.text(max_size=12))
def test_byte_tokenizer_round_trip_property(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_encode_batch_left_and_right_padding():
    tok = CharTokenizer("abc")
    tokens, mask = tok.encode_batch(["ab", "c"], max_length=4, padding_side="left")
    np.testing.assert_array_equal(tokens, [[0, 1, 3, 4], [0, 0, 1, 5]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 1, 1]])
    assert tokens.dtype == np.int32 and mask.dtype == np.int32
    tokens, mask = tok.encode_batch(["ab", "c"], max_length=4, padding_side="right")
    np.testing.assert_array_equal(tokens, [[1, 3, 4, 0], [1, 5, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 1, 0, 0]])
    # Without max_length: pad to the longest; without BOS.
    tokens, mask = tok.encode_batch(["abc", "a"], add_bos=False)
    np.testing.assert_array_equal(tokens, [[3, 4, 5], [0, 0, 3]])
    assert tok.decode_batch(tokens, mask) == ["abc", "a"]


def test_encode_batch_over_long_prompt_error_and_truncation():
    with pytest.raises(ValueError, match=r"text 1 has 5 tokens, more than max_length=4"):
        CharTokenizer("abc").encode_batch(["a", "abca"], max_length=4)
    left = CharTokenizer("abc", truncation="left")
    tokens, mask = left.encode_batch(["abcab"], max_length=4)
    # BOS kept, then the last three characters.
    assert left.decode(tokens[0]) == "cab" and tokens[0, 0] == left.bos_id
    right = CharTokenizer("abc", truncation="right")
    tokens, _ = right.encode_batch(["abcab"], max_length=4)
    assert right.decode(tokens[0]) == "abc"


def test_encode_batch_argument_errors():
    tok = CharTokenizer("ab")
    with pytest.raises(ValueError, match="padding_side='middle' is not one of"):
        tok.encode_batch(["a"], padding_side="middle")
    with pytest.raises(ValueError, match="max_length must be an integer >= 1"):
        tok.encode_batch(["a"], max_length=0)
    with pytest.raises(ValueError, match="texts must be a sequence of strings"):
        tok.encode_batch("ab")
    with pytest.raises(ValueError, match=r"texts must be strings, but texts\[1\] is int: 123"):
        tok.encode_batch(["a", 123])
    with pytest.raises(ValueError, match=r"texts\[0\] is NoneType"):
        ByteTokenizer().encode_batch([None])
    with pytest.raises(ValueError, match=r"mask shape \(1, 2\) != tokens shape \(1, 3\)"):
        tok.decode_batch(np.zeros((1, 3), np.int32), np.zeros((1, 2), np.int32))


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator(["what is one plus two", "three four five", "plus minus"], trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_hf_tokenizer_from_file(hf_tokenizer):
    tok = HFTokenizer.from_file(hf_tokenizer, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.add_bos
    ids = tok.encode("one plus two")
    assert len(ids) == 3 and all(i > 3 for i in ids)
    assert tok.decode(ids + [tok.eos_id] + ids) == "one plus two"
    tokens, mask = tok.encode_batch(["one plus two", "five"], max_length=5)
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    assert tokens[1, 3] == tok.bos_id and tokens[0, 0] == tok.pad_id
    assert tok.decode_batch(tokens, mask) == ["one plus two", "five"]
    with pytest.raises(ValueError, match="text 0 has 4 tokens, more than max_length=3") as e:
        tok.encode_batch(["one plus two"], max_length=3)
    assert e.value.with_bos and e.value.length == 4
    with pytest.raises(ValueError, match="text 0 has 3 tokens, more than max_length=2") as e:
        tok.encode_batch(["one plus two"], max_length=2, add_bos=False)
    assert not e.value.with_bos
    assert isinstance(tok, Tokenizer)


def _with_template(path, single):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.processors import TemplateProcessing

    rust = RustTokenizer.from_file(str(path))
    specials = [(t, rust.token_to_id(t)) for t in ("<s>", "</s>") if t in single]
    rust.post_processor = TemplateProcessing(single=single, special_tokens=specials)
    return rust


@pytest.mark.parametrize(
    "single, bos",
    [("<s> $A", "<s>"), ("<s> $A </s>", "<s>"), ("$A </s>", None), ("$A", None)],
)
def test_auto_bos_is_the_token_the_post_processor_puts_first(hf_tokenizer, single, bos):
    rust = _with_template(hf_tokenizer, single)
    tok = HFTokenizer(rust, pad_token="<pad>", eos_token="</s>", bos_token="auto")
    assert tok.bos_token == bos and tok.add_bos == (bos is not None)
    tokens, mask = tok.encode_batch(["one plus two"], max_length=4)
    # Prompts begin as transformers' tokenizer(text) begins them (the file's post-processor,
    # which a fast tokenizer runs); nothing goes at the end.
    reference = rust.encode("one plus two").ids
    if reference[-1] == rust.token_to_id("</s>"):
        reference = reference[:-1]
    assert tokens[0][mask[0] == 1].tolist() == reference
    assert tok.encode("one plus two") == [i for i in reference if i != tok.bos_id]


def test_auto_bos_refuses_two_leading_tokens(hf_tokenizer):
    rust = _with_template(hf_tokenizer, "<s> </s> $A")
    with pytest.raises(ValueError, match=r"^bos_token='auto': .* puts 2 tokens \['<s>', '</s>'\]"):
        HFTokenizer(rust, pad_token="<pad>", eos_token="</s>", bos_token="auto")


def test_truncation_and_padding_saved_in_tokenizer_json_are_ignored(hf_tokenizer, tmp_path):
    from tokenizers import Tokenizer as RustTokenizer

    rust = RustTokenizer.from_file(str(hf_tokenizer))
    rust.enable_truncation(max_length=2)  # as a tokenizer.json saved after use can carry
    rust.enable_padding(pad_id=0, pad_token="<pad>", length=6)
    path = tmp_path / "tokenizer.json"
    rust.save(str(path))
    for source in (path, rust):
        tok = HFTokenizer(source, pad_token="<pad>", eos_token="</s>")
        assert len(tok.encode("one plus two")) == 3  # not cut to 2, not padded to 6
        with pytest.raises(ValueError, match="text 0 has 3 tokens, more than max_length=2"):
            tok.encode_batch(["one plus two"], max_length=2)
        tokens, mask = tok.encode_batch(["five"], max_length=4)
        np.testing.assert_array_equal(mask, [[0, 0, 0, 1]])  # pads are not prompt tokens
    assert rust.truncation is not None  # the caller's object is left as it was
    rust.no_truncation()  # fixed-length padding alone
    tok = HFTokenizer(rust, pad_token="<pad>", eos_token="</s>")
    assert len(tok.encode("five")) == 1


def _gapped_vocabulary(tmp_path):
    """A tokenizer.json with ids 0-2 and 5-6 whose pad, EOS and BOS (0, 1, 2) are plain
    entries, not registered special tokens."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "a": 5, "b": 6}
    rust = RustTokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    rust.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    rust.save(str(tmp_path / "tokenizer.json"))
    return tmp_path / "tokenizer.json"


def test_hf_tokenizer_vocab_size_covers_ids_with_gaps(tmp_path):
    # Ids 0-2 and 5-6: four entries, but the embedding needs rows up to id 6.
    tok = HFTokenizer.from_file(_gapped_vocabulary(tmp_path), pad_token="<pad>", eos_token="</s>")
    assert tok.vocab_size == 7
    assert max(tok.encode("ab")) < tok.vocab_size


def test_hf_tokenizer_truncation_and_errors(hf_tokenizer):
    tok = HFTokenizer(str(hf_tokenizer), pad_token="<pad>", eos_token="</s>", truncation="left")
    assert tok.bos_id is None and not tok.add_bos
    tokens, _ = tok.encode_batch(["one plus two"], max_length=2)
    assert tok.decode(tokens[0]) == "plus two"
    with pytest.raises(ValueError, match=r"eos_token='<eos>' is not in the tokenizer's vocabulary"):
        HFTokenizer(hf_tokenizer, pad_token="<pad>", eos_token="<eos>")
    with pytest.raises(ValueError, match=r"add_bos must be True, False or None .auto., got 'yes'"):
        HFTokenizer(hf_tokenizer, pad_token="<pad>", eos_token="</s>", add_bos="yes")
    with pytest.raises(ValueError, match="add_bos=True needs a bos_token; this tokenizer was giv"):
        HFTokenizer(hf_tokenizer, pad_token="<pad>", eos_token="</s>", add_bos=True)
    no_pad = r"^pad_token must be a token string of the vocabulary \(a tokenizer without one "
    with pytest.raises(ValueError, match=no_pad + r"can use its EOS token\), got None$"):
        HFTokenizer(hf_tokenizer, pad_token=None, eos_token="</s>")
    with pytest.raises(ValueError, match="does not exist"):
        HFTokenizer("/nonexistent/tokenizer.json", pad_token="<pad>", eos_token="</s>")
    folder = str(hf_tokenizer.parent)
    with pytest.raises(ValueError, match=re.escape(f"tokenizer file '{folder}' is a directory")):
        HFTokenizer(folder, pad_token="<pad>", eos_token="</s>")
    garbage = hf_tokenizer.parent / "garbage.json"
    garbage.write_text("{}")
    with pytest.raises(ValueError, match=re.escape(f"could not load tokenizer file '{garbage}'")):
        HFTokenizer(garbage, pad_token="<pad>", eos_token="</s>")
    with pytest.raises(ValueError, match="add_bos=True but this tokenizer has no bos_id"):
        tok.encode_batch(["one"], add_bos=True)


def test_decode_batch_skips_positions_the_mask_hides():
    from novarl_jax.rollout.tokenizers import CharTokenizer

    tok = CharTokenizer("abc")  # a=3, b=4, c=5
    assert tok.decode_batch(np.array([[3, 4, 5]]), np.array([[1, 0, 1]])) == ["ac"]


def test_prompts_decode_where_bos_and_eos_share_an_id(tmp_path):
    """GPT-2-style vocabularies use one <|endoftext|> as BOS, EOS and (often) padding: prompts
    decode with stop_at_eos=False, and a completion that starts with it is empty."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<|endoftext|>", "<unk>"])
    tok.train_from_iterator(["one plus two", "three"], trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    end = "<|endoftext|>"
    hf = HFTokenizer.from_file(path, pad_token=end, eos_token=end, bos_token=end)
    assert hf.pad_id == hf.bos_id == hf.eos_id
    tokens, mask = hf.encode_batch(["one plus two", "three"], max_length=5)
    assert tokens[1, 3] == hf.bos_id
    assert hf.decode_batch(tokens, mask, stop_at_eos=False) == ["one plus two", "three"]
    ids = hf.encode("one plus")
    assert hf.decode([hf.eos_id, *ids]) == ""  # a completion that ended at once
    assert hf.decode([*ids, hf.eos_id, *ids]) == "one plus"


def test_encode_batch_accepts_numpy_integer_lengths():
    tok = CharTokenizer("ab")
    tokens, _ = tok.encode_batch(["ab"], max_length=np.int64(4))
    assert tokens.shape == (1, 4)


def test_a_text_of_exactly_max_length_tokens_fits():
    tok = CharTokenizer("abc")
    tokens, mask = tok.encode_batch(["abc"], max_length=4)  # BOS + 3
    np.testing.assert_array_equal(tokens, [[1, 3, 4, 5]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1]])
    with pytest.raises(ValueError, match=r"text 0 has 5 tokens, more than max_length=4"):
        tok.encode_batch(["abca"], max_length=4)


def test_an_empty_batch_of_texts_keeps_one_padding_column():
    tokens, mask = CharTokenizer("abc").encode_batch([""], add_bos=False)
    assert tokens.shape == mask.shape == (1, 1)
    assert mask.tolist() == [[0]]


def test_decode_batch_refuses_a_flat_row():
    with pytest.raises(ValueError, match=r"tokens must have shape \[B, T\], got \(2,\)"):
        CharTokenizer("abc").decode_batch(np.array([3, 4]))


def test_decode_drops_pad_bos_and_eos_even_when_not_registered_as_special(tmp_path):
    tok = HFTokenizer(
        _gapped_vocabulary(tmp_path), pad_token="<pad>", eos_token="</s>", bos_token="<s>"
    )
    assert tok.decode([2, 5, 0, 6]) == "a b"
    assert tok.decode([2, 5, 6]) == "a b"
    assert tok.decode([2, 5, 1, 6], stop_at_eos=False) == "a b"
    assert tok.decode([2, 5, 1, 6]) == "a"


def test_hf_encode_bypasses_the_post_processor_and_decode_skips_specials(hf_tokenizer, tmp_path):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import processors

    rust = RustTokenizer.from_file(str(hf_tokenizer))
    rust.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    assert rust.encode("one plus two").ids[0] == 1  # the post-processor adds BOS and EOS ...
    tok = HFTokenizer(rust, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    ids = tok.encode("one plus two")
    assert len(ids) == 3 and not {1, 2} & set(ids)  # ... encode adds neither
    tokens, mask = tok.encode_batch(["one plus two"])
    assert tokens.tolist() == [[1, *ids]]  # BOS once, from add_bos
    unk = tok.encode("zzz one")
    assert unk[0] == 3  # <unk>, a registered special token
    assert tok.decode(unk) == "one"


def test_an_unknown_bos_token_is_named_as_bos_token(hf_tokenizer):
    with pytest.raises(ValueError, match=r"^bos_token='<bos>' is not in the tokenizer's vocab"):
        HFTokenizer(hf_tokenizer, pad_token="<pad>", eos_token="</s>", bos_token="<bos>")


def _bpe_without_unknown_token(unk_token=None, pre_tokenizer=None):
    """A character-level BPE over "a", "b" (and "<unk>" when given) with one special token."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models

    vocab = {"<pad>": 0, "</s>": 1, "a": 2, "b": 3, "<unk>": 4}
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk_token))
    rust.add_special_tokens(["<|im_start|>"])
    if pre_tokenizer is not None:
        rust.pre_tokenizer = pre_tokenizer
    return HFTokenizer(rust, pad_token="<pad>", eos_token="</s>")


def test_characters_a_tokenizer_without_unknown_token_would_drop_are_refused():
    # BPE drops characters missing from its vocabulary when it has no unknown token: "abc"
    # encoded as "ab", silently changing the prompt.
    from tokenizers import pre_tokenizers

    tok = _bpe_without_unknown_token(pre_tokenizer=pre_tokenizers.Whitespace())
    assert tok.encode("ab a") == [2, 3, 2]  # the pre-tokenizer drops spaces by design
    assert tok.encode("<|im_start|>ab") == [5, 2, 3]  # special tokens are not characters
    with pytest.raises(ValueError, match=r"^characters 'c' of 'abca' have no token in the "
                       r"tokenizer's vocabulary, which has no unknown token, so they would be "
                       r"dropped silently"):  # fmt: skip
        tok.encode("abca")
    with pytest.raises(ValueError, match=r"characters '<c' of 'b<\|im_start\|>c<'"):
        tok.encode_batch(["ab", "b<|im_start|>c<"])
    # Without a pre-tokenizer the spaces reach the model, which drops them too: "aba".
    with pytest.raises(ValueError, match=r"^characters ' ' of 'ab a'"):
        _bpe_without_unknown_token().encode("ab a")
    # With an unknown token, the character becomes that token, as Hugging Face encodes it.
    assert _bpe_without_unknown_token("<unk>").encode("abc") == [2, 3, 4]


def test_an_added_token_inside_a_longer_one_leaves_none_of_it_to_the_character_check():
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models

    vocab = {"<pad>": 0, "</s>": 1, "h": 2, "i": 3}
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=[]))
    rust.add_special_tokens(["<|im", "<|im_start|>"])  # one a prefix of the other
    tok = HFTokenizer(rust, pad_token="<pad>", eos_token="</s>")
    assert tok.encode("<|im_start|>hi<|im") == [5, 2, 3, 4]


def test_the_dropped_character_check_sees_what_the_model_sees():
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    # SentencePiece-style: "€" alone encodes to "▁" (the word start), but in "ab€" the model
    # drops it.
    vocab = {"<pad>": 0, "</s>": 1, "a": 2, "b": 3, "▁": 4, "▁a": 5}
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=[("▁", "a")]))
    rust.pre_tokenizer = pre_tokenizers.Metaspace()
    tok = HFTokenizer(rust, pad_token="<pad>", eos_token="</s>")
    assert tok.encode("ab ab") == [5, 3, 5, 3]
    with pytest.raises(ValueError, match=r"^characters '€' of 'ab€'"):
        tok.encode("ab€")
    # Byte-level (GPT-2, Llama 3, Qwen): every byte has a symbol; a normalizer that strips
    # accents or control characters removes them on purpose.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    rust = RustTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    rust.normalizer = normalizers.Sequence(
        [normalizers.BertNormalizer(clean_text=True), normalizers.NFD(), normalizers.StripAccents()]
    )
    rust.add_special_tokens(["<pad>", "</s>"])
    tok = HFTokenizer(rust, pad_token="<pad>", eos_token="</s>")
    assert tok.decode(tok.encode("cafe\u0301 \x00😀")) == "cafe 😀"
    # A word-level tokenizer encodes words, not characters: its whole-text encoding decides.
    rust = RustTokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "hello": 2, "world": 3}))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = HFTokenizer(rust, pad_token="<pad>", eos_token="</s>")
    assert tok.encode_batch(["hello world"], add_bos=False)[0].tolist() == [[2, 3]]


def test_a_tokenizer_that_fails_on_a_text_is_named_with_the_text():
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers

    # WordLevel with an unknown token missing from its vocabulary raises a bare Exception.
    rust = RustTokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "a": 2}, unk_token="<zz>"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = HFTokenizer(rust, pad_token="<pad>", eos_token="</s>")
    assert tok.encode("a a") == [2, 2]
    with pytest.raises(ValueError, match=r"^the tokenizer cannot encode 'a c': WordLevel error"):
        tok.encode("a c")
