"""Tokenizers for rollouts: a built-in character/byte tokenizer and a Hugging Face wrapper.

Every tokenizer here has the same small interface, which is all the rollout engine uses:

- ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id`` (ints);
- ``encode(text) -> list[int]`` (no special tokens) and ``decode(ids) -> str`` (stops at the
  first ``eos_id`` and drops padding / special tokens);
- ``encode_batch(texts, max_length=..., padding_side=...) -> (tokens, mask)`` as NumPy int32
  ``[B, T]`` arrays, ``mask`` 1 = a real token;
- ``decode_batch(tokens, mask=None) -> list[str]``;
- ``vocabulary() -> dict[str, int]``, every token's text and id (a run records it in its
  workdir, so that a resume or an export with another tokenizer is refused).

Prompts longer than ``max_length`` raise a ValueError naming the maximum, unless the
tokenizer was built with ``truncation='left'`` (keep the last tokens, the usual choice for
prompts whose question is at the end) or ``truncation='right'`` (keep the first tokens).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from novarl_jax.core.checks import is_integer
from novarl_jax.rollout.chat import RenderError, is_conversation

PADDING_SIDES = ("left", "right")
TRUNCATION_MODES = ("error", "left", "right")
# HFTokenizer's bos_token that means: the one the tokenizer.json's post-processor adds.
AUTO_BOS = "auto"


class TextTooLongError(ValueError):
    """A text has more tokens than ``max_length`` and the tokenizer does not truncate.

    Attributes: ``index`` (of the text in the batch), ``text``, ``length`` (tokens, BOS
    included when the tokenizer adds one), ``max_length``, ``with_bos`` (whether it does) and
    ``templated`` (whether the text was rendered with a chat template first).
    """

    def __init__(
        self, index: int, text: str, length: int, max_length: int, with_bos=False,
        templated=False,
    ):  # fmt: skip
        super().__init__(
            f"text {index} has {length} tokens, more than max_length={max_length}; shorten "
            f"it, raise max_length, or build the tokenizer with truncation='left' or 'right'"
        )
        self.index, self.text, self.length, self.max_length = index, text, length, max_length
        self.with_bos = bool(with_bos)
        self.templated = bool(templated)


class UnencodableTextError(ValueError):
    """A text of a batch the tokenizer cannot encode: characters outside a character
    tokenizer's alphabet, or ones a tokenizer.json has no token for. Attributes: ``index`` (of
    the text in the batch) and ``reason`` (the tokenizer's own message)."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"text {index}: {reason}")
        self.index, self.reason = index, reason


@runtime_checkable
class Tokenizer(Protocol):
    """What the rollout engine needs from a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, stop_at_eos: bool = True) -> str: ...

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        max_length: int | None = None,
        padding_side: str = "left",
        add_bos: bool | None = None,
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def decode_batch(
        self, tokens: Any, mask: Any = None, *, stop_at_eos: bool = True
    ) -> list[str]: ...


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


class _BaseTokenizer:
    """Batch encode/decode with padding and truncation, shared by every tokenizer here.

    Subclasses set ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``, ``add_bos`` and
    ``truncation`` and implement ``encode`` and ``_decode_ids`` (ids already cut at eos).
    """

    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int
    add_bos: bool
    truncation: str

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode_ids(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _special_ids(self) -> set[int]:
        return {i for i in (self.pad_id, self.bos_id, self.eos_id) if i is not None}

    def vocabulary(self) -> dict[str, int]:
        """Every token's text and id: two tokenizers whose vocabularies agree on a token give
        it the same id. Special ids without a text of their own are in ``pad_id``, ``bos_id``
        and ``eos_id``."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int], *, stop_at_eos: bool = True) -> str:
        """Text of ``ids``, cut at the first ``eos_id`` (when ``stop_at_eos``).

        Padding, BOS and EOS ids are dropped from the text. Where BOS and EOS share one id
        (GPT-2's ``<|endoftext|>``), decode encoded prompts with ``stop_at_eos=False``: their
        leading BOS would otherwise read as the end.
        """
        out: list[int] = []
        special = self._special_ids()
        flat = np.asarray(ids).reshape(-1)
        if flat.size and not np.issubdtype(flat.dtype, np.integer):
            raise TypeError(f"ids must be integer token ids, got dtype {flat.dtype}")
        if flat.size and flat.min() < 0:
            raise ValueError(f"ids must be token ids >= 0, got {int(flat.min())}")
        for i in flat.tolist():
            if stop_at_eos and i == self.eos_id:
                break
            if i not in special:
                out.append(int(i))
        return self._decode_ids(out)

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        max_length: int | None = None,
        padding_side: str = "left",
        add_bos: bool | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encodes and pads a batch of texts.

        Args:
            texts: B strings (or, with a chat template, conversations: lists of
                ``{"role", "content"}`` messages).
            max_length: T, the padded length. None pads to the longest text. A text longer
                than ``max_length`` raises ValueError, or is truncated on the side set by the
                tokenizer's ``truncation``.
            padding_side: 'left' (real tokens at the end, what the sampler wants) or 'right'.
            add_bos: prepend ``bos_id``; None uses the tokenizer's default.

        Returns:
            ``(tokens, mask)``: int32 ``[B, T]`` arrays; ``mask`` 1 = a real token, 0 = padding
            (padding positions hold ``pad_id``).

        Raises:
            ValueError: bad ``padding_side``/``max_length``, a text that is not a str, or a
                text longer than ``max_length`` with ``truncation='error'``
                (:class:`TextTooLongError`), or a text the tokenizer cannot encode
                (:class:`UnencodableTextError`); :class:`~novarl_jax.rollout.chat.RenderError`:
                a conversation the chat template cannot render, or any without one.
        """
        _check_choice("padding_side", padding_side, PADDING_SIDES)
        if isinstance(texts, str):
            raise ValueError("texts must be a sequence of strings, got a single str")
        if max_length is not None:
            if not is_integer(max_length) or max_length < 1:
                raise ValueError(f"max_length must be an integer >= 1 or None, got {max_length!r}")
            max_length = int(max_length)
        use_bos = self.add_bos if add_bos is None else add_bos
        if use_bos and self.bos_id is None:
            raise ValueError("add_bos=True but this tokenizer has no bos_id")
        rows = []
        templated = getattr(self, "chat_template", None) is not None
        for index, text in enumerate(texts):
            if is_conversation(text) and not templated:
                error = RenderError(
                    f"texts[{index}] is a conversation (a list of messages), which only a "
                    f"tokenizer with a chat template encodes: {text!r:.60}"
                )
                error.index = index
                raise error
            if not isinstance(text, str) and not is_conversation(text):
                raise ValueError(
                    f"texts must be strings, but texts[{index}] is {type(text).__name__}: "
                    f"{text!r:.60}"
                )
            try:
                ids = ([self.bos_id] if use_bos else []) + self.encode(text)
            except RenderError as e:
                e.index = index
                raise
            except ValueError as e:
                raise UnencodableTextError(index, str(e)) from None
            if max_length is not None and len(ids) > max_length:
                if self.truncation == "error":
                    raise TextTooLongError(index, text, len(ids), max_length, use_bos, templated)
                if self.truncation == "left":
                    # Keep the BOS token (when used) and the last tokens of the text.
                    head = ids[:1] if use_bos else []
                    ids = head + ids[len(ids) - (max_length - len(head)) :]
                else:
                    ids = ids[:max_length]
            rows.append(ids)
        length = max_length if max_length is not None else max((len(r) for r in rows), default=1)
        length = max(length, 1)
        tokens = np.full((len(rows), length), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(rows), length), dtype=np.int32)
        for b, ids in enumerate(rows):
            n = len(ids)
            if n == 0:
                continue
            if padding_side == "left":
                tokens[b, length - n :] = ids
                mask[b, length - n :] = 1
            else:
                tokens[b, :n] = ids
                mask[b, :n] = 1
        return tokens, mask

    def decode_batch(self, tokens: Any, mask: Any = None, *, stop_at_eos: bool = True) -> list[str]:
        """Decodes each row of ``tokens`` [B, T]; positions where ``mask`` is 0 are skipped."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape [B, T], got {tokens.shape}")
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != tokens.shape:
                raise ValueError(f"mask shape {mask.shape} != tokens shape {tokens.shape}")
        out = []
        for b in range(tokens.shape[0]):
            row = tokens[b] if mask is None else tokens[b][mask[b] != 0]
            out.append(self.decode(row, stop_at_eos=stop_at_eos))
        return out


class CharTokenizer(_BaseTokenizer):
    """One token per character of a fixed alphabet; ids 0..2 are pad, bos, eos.

    Small vocabularies (a task's alphabet plus three specials) let tiny policies learn toy
    tasks quickly. Characters outside the alphabet raise a ValueError naming them.

    Args:
        alphabet: the characters, each once; character ``alphabet[i]`` has id ``i + 3``.
        add_bos: prepend BOS in ``encode_batch`` by default.
        truncation: 'error' (default), 'left' or 'right' for texts over ``max_length``.

    Example:
        >>> tok = CharTokenizer("0123456789+=")
        >>> tok.encode("1+2=")
        [4, 13, 5, 14]
        >>> tok.decode([4, 2, 5])
        '1'
    """

    PAD, BOS, EOS = 0, 1, 2

    def __init__(self, alphabet: str, *, add_bos: bool = True, truncation: str = "error"):
        if not isinstance(alphabet, str) or not alphabet:
            raise ValueError(f"alphabet must be a non-empty string, got {alphabet!r}")
        if len(set(alphabet)) != len(alphabet):
            dup = sorted({c for c in alphabet if alphabet.count(c) > 1})
            raise ValueError(f"alphabet has repeated characters {dup}")
        _check_choice("truncation", truncation, TRUNCATION_MODES)
        self.alphabet = alphabet
        self._ids = {c: i + 3 for i, c in enumerate(alphabet)}
        self.pad_id, self.bos_id, self.eos_id = self.PAD, self.BOS, self.EOS
        self.vocab_size = len(alphabet) + 3
        self.add_bos = add_bos
        self.truncation = truncation

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as err:
            raise ValueError(
                f"character {err.args[0]!r} is not in the alphabet {self.alphabet!r}"
            ) from None

    def _decode_ids(self, ids: list[int]) -> str:
        return "".join(self.alphabet[i - 3] for i in ids if 3 <= i < self.vocab_size)

    def vocabulary(self) -> dict[str, int]:
        return dict(self._ids)

    def __repr__(self) -> str:
        return f"CharTokenizer(alphabet={self.alphabet!r})"


class ByteTokenizer(_BaseTokenizer):
    """UTF-8 bytes as tokens: id = byte + 3; ids 0..2 are pad, bos, eos (vocab 259).

    Decoding replaces invalid UTF-8 (a model may emit any byte sequence) with U+FFFD.

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.encode("hi")
        [107, 108]
        >>> tok.decode([107, 108, 2, 50])
        'hi'
    """

    PAD, BOS, EOS = 0, 1, 2
    OFFSET = 3

    def __init__(self, *, add_bos: bool = True, truncation: str = "error"):
        _check_choice("truncation", truncation, TRUNCATION_MODES)
        self.pad_id, self.bos_id, self.eos_id = self.PAD, self.BOS, self.EOS
        self.vocab_size = 256 + self.OFFSET
        self.add_bos = add_bos
        self.truncation = truncation

    def encode(self, text: str) -> list[int]:
        return [b + self.OFFSET for b in text.encode("utf-8")]

    def _decode_ids(self, ids: list[int]) -> str:
        data = bytes(i - self.OFFSET for i in ids if self.OFFSET <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def vocabulary(self) -> dict[str, int]:
        return {f"<0x{b:02X}>": b + self.OFFSET for b in range(256)}

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def leading_special_token(tokenizer: Any) -> str | None:
    """The special token a ``tokenizers.Tokenizer``'s post-processor puts before a single
    text (what transformers' ``tokenizer(text)`` begins with), or None when it puts none.

    Raises:
        ValueError: it puts more than one token there (no single one is the BOS).
    """
    encoding = tokenizer.encode("a")  # add_special_tokens: the post-processor runs
    lead = []
    for token, special in zip(encoding.tokens, encoding.special_tokens_mask, strict=True):
        if not special:
            break
        lead.append(token)
    if len(lead) > 1:
        raise ValueError(
            f"bos_token='auto': the tokenizer's post-processor puts {len(lead)} tokens "
            f"{lead} before a text, not one BOS; name the one prompts begin with, or none"
        )
    return lead[0] if lead else None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else repr(err)


class HFTokenizer(_BaseTokenizer):
    """A Hugging Face ``tokenizers`` tokenizer (tokenizer.json) behind the rollout interface.

    Special tokens are given by their strings and must exist in the vocabulary. ``encode``
    adds no special tokens (the tokenizer's post-processor is bypassed); BOS is added by
    ``encode_batch`` when ``add_bos``. ``bos_token='auto'`` takes the token the file's
    post-processor puts before a text, so prompts begin as transformers' ``tokenizer(text)``
    begins them (``<s>`` for Llama 2 and Mistral, ``<|begin_of_text|>`` for Llama 3; none
    for a file that adds none). Truncation and padding settings saved in the tokenizer.json
    are ignored: lengths follow ``max_length`` and ``truncation`` here.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``, or a path to a tokenizer.json file.
        pad_token, eos_token: strings of the padding and end-of-sequence tokens.
        bos_token: string of the beginning-of-sequence token, ``'auto'`` (see above), or
            None. The attributes ``pad_token``, ``eos_token`` and ``bos_token`` hold the
            strings used (``bos_token`` resolved).
        add_bos: prepend BOS in ``encode_batch`` by default (needs ``bos_token``).
        truncation: 'error' (default), 'left' or 'right' for texts over ``max_length``.
        chat_template: a :class:`~novarl_jax.rollout.chat.ChatTemplate`: ``encode`` then
            renders each text as a prompt with it first (the user turn and the opening of
            the assistant's; texts a rollout encodes are prompts), and ``encode_batch`` also
            takes conversations (lists of ``{"role", "content"}`` messages); None to encode
            texts as they are.

    Raises:
        ValueError: the path is missing, a directory or not a loadable tokenizer.json, a
            special token is not in the vocabulary, ``bos_token='auto'`` for a post-processor
            that puts more than one token before a text, or a bad ``truncation``.

    Example:
        >>> tok = HFTokenizer("tokenizer.json", pad_token="<pad>", eos_token="</s>",
        ...                   bos_token="<s>")  # doctest: +SKIP
        >>> tokens, mask = tok.encode_batch(["1+2="], max_length=16)  # doctest: +SKIP
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        pad_token: str,
        eos_token: str,
        bos_token: str | None = None,
        add_bos: bool | None = None,
        truncation: str = "error",
        chat_template: Any = None,
    ):
        from tokenizers import Tokenizer as _HFTok

        _check_choice("truncation", truncation, TRUNCATION_MODES)
        if isinstance(tokenizer, (str, os.PathLike)):
            path = os.fspath(tokenizer)
            if not os.path.exists(path):
                raise ValueError(f"tokenizer file {path!r} does not exist")
            if os.path.isdir(path):
                raise ValueError(
                    f"tokenizer file {path!r} is a directory; pass the tokenizer.json file in "
                    f"it (e.g. {os.path.join(path, 'tokenizer.json')!r})"
                )
            try:
                tokenizer = _HFTok.from_file(path)
            except Exception as err:  # tokenizers raises a bare Exception
                raise ValueError(
                    f"could not load tokenizer file {path!r} as a Hugging Face tokenizer.json: "
                    f"{_first_line(err)}"
                ) from err
        if not isinstance(tokenizer, _HFTok):
            raise ValueError(
                f"tokenizer must be a tokenizers.Tokenizer or a path to tokenizer.json, "
                f"got {type(tokenizer)!r}"
            )
        if tokenizer.truncation is not None or tokenizer.padding is not None:
            # A tokenizer.json saved after use can carry its own truncation or fixed-length
            # padding: it would cut prompts silently or make pads real prompt tokens. Lengths
            # are this class's (max_length, truncation); a copy keeps the caller's object.
            tokenizer = _HFTok.from_str(tokenizer.to_str())
            tokenizer.no_truncation()
            tokenizer.no_padding()
        self._tok = tokenizer
        # A BPE model without an unknown token drops the characters it has no token for
        # (WordLevel and Unigram fail on them instead): encode() checks, per character that
        # reaches the model, that it gives a token.
        from tokenizers import models as _models

        model = tokenizer.model
        unk = getattr(model, "unk_token", None)
        self._may_drop = isinstance(model, _models.BPE) and (
            unk is None or tokenizer.token_to_id(unk) is None
        )
        self._kept: set[str] = set()  # characters the model was seen to give a token for
        added = tokenizer.get_added_tokens_decoder().values()
        added = sorted({t.content for t in added if t.content}, key=len, reverse=True)
        # Longest first, so a token inside a longer one (<|im, <|im_start|>) splits neither.
        self._added = re.compile("|".join(map(re.escape, added))) if added else None

        def token_id(field: str, token: str) -> int:
            if not isinstance(token, str):
                hint = (
                    " (a tokenizer without one can use its EOS token)"
                    if field == "pad_token"
                    else ""
                )
                raise ValueError(
                    f"{field} must be a token string of the vocabulary{hint}, got {token!r}"
                )
            tid = tokenizer.token_to_id(token)
            if tid is None:
                raise ValueError(f"{field}={token!r} is not in the tokenizer's vocabulary")
            return int(tid)

        if bos_token == AUTO_BOS:
            bos_token = leading_special_token(tokenizer)
        self.pad_id = token_id("pad_token", pad_token)
        self.eos_id = token_id("eos_token", eos_token)
        self.bos_id = None if bos_token is None else token_id("bos_token", bos_token)
        self.pad_token, self.eos_token, self.bos_token = pad_token, eos_token, bos_token
        # Ids need not be contiguous: the embedding must hold the largest one.
        ids = tokenizer.get_vocab(with_added_tokens=True).values()
        count = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self.vocab_size = max(count, max(ids, default=-1) + 1)
        if add_bos is not None and not isinstance(add_bos, bool | np.bool_):
            raise ValueError(f"add_bos must be True, False or None (auto), got {add_bos!r}")
        if add_bos and self.bos_id is None:
            raise ValueError("add_bos=True needs a bos_token; this tokenizer was given none")
        self.add_bos = (self.bos_id is not None) if add_bos is None else bool(add_bos)
        self.truncation = truncation
        self.chat_template = chat_template

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs: Any) -> HFTokenizer:
        """Loads a tokenizer.json; ``kwargs`` as in the constructor."""
        return cls(path, **kwargs)

    def encode(self, text: str) -> list[int]:
        if self.chat_template is not None:
            text = self.chat_template.render(text)
        try:
            encoding = self._tok.encode(text, add_special_tokens=False)
        except Exception as err:  # tokenizers raises a bare Exception
            raise ValueError(
                f"the tokenizer cannot encode {text!r:.60}: {_first_line(err)}"
            ) from None
        if self._may_drop:
            self._check_characters(text)
        return list(encoding.ids)

    def _check_characters(self, text: str) -> None:
        """Raises ValueError naming the characters the BPE model would drop from ``text``: as
        the tokenizer hands them to the model (special tokens split off, normalized,
        pre-tokenized: a byte-level tokenizer's byte symbols, a SentencePiece-style one's
        '▁'), each that the model makes no token of. Characters that passed are remembered."""
        tok = self._tok
        # The added tokens (those a chat template writes, e.g. <|im_start|>) split the text
        # wherever they occur, and each part between them is normalized and pre-tokenized on
        # its own (single_word and normalized added tokens are matched as special ones are).
        parts = self._added.split(text) if self._added is not None else [text]
        pieces = []
        for part in filter(None, parts):
            if tok.normalizer is not None:  # which may drop characters on purpose (accents, ...)
                part = tok.normalizer.normalize_str(part)
            if tok.pre_tokenizer is not None:
                pieces += [piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str(part)]
            else:
                pieces.append(part)
        missing = []
        for c in sorted(set().union(*pieces) - self._kept):
            if tok.model.tokenize(c):
                self._kept.add(c)
            else:
                missing.append(c)
        if missing:
            raise ValueError(
                f"characters {''.join(missing)!r} of {text!r:.60} have no token in the "
                f"tokenizer's vocabulary, which has no unknown token, so they would be dropped "
                f"silently; add them (or an unk_token) to tokenizer.json, or remove them from "
                f"the text"
            )

    def _decode_ids(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def vocabulary(self) -> dict[str, int]:
        return {t: int(i) for t, i in self._tok.get_vocab(with_added_tokens=True).items()}

    def to_json(self) -> str:
        """The wrapped tokenizer as tokenizer.json text."""
        return self._tok.to_str()

    def __repr__(self) -> str:
        info = {"vocab_size": self.vocab_size, "pad_id": self.pad_id, "eos_id": self.eos_id}
        return f"HFTokenizer({json.dumps(info)})"
