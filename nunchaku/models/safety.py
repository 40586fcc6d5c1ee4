"""Prompt safety checking for the apps.

The default checker is ShieldGemma-2b (google/shieldgemma-2b, a Gemma-2 2B causal LM): the
prompt is put in its policy template, and the softmax over the next-token logits of 'Yes' and
'No' gives P('Yes') = P(the prompt violates the policy). Above the threshold (0.2) the prompt
is unsafe; the apps then generate from a harmless replacement prompt instead (screen_prompt).

Plugging in another checker: any object with a `check(prompt: str) -> SafetyVerdict` method
satisfies the SafetyChecker protocol (no subclassing needed), e.g.

    class KeywordChecker:
        def check(self, prompt: str) -> SafetyVerdict:
            hit = any(w in prompt.lower() for w in BLOCKLIST)
            return SafetyVerdict(unsafe=hit, score=float(hit), reason="blocklisted word" if hit else "")

    prompt, verdict = screen_prompt(user_prompt, KeywordChecker())

screen_prompt rejects empty prompts before calling the checker, so checkers may assume a
non-blank prompt. A ShieldGemma-style classifier with another model or policy only needs
ShieldGemmaChecker(model_id_or_path=..., policy=...).
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

DEFAULT_MODEL_ID = "google/shieldgemma-2b"
DEFAULT_THRESHOLD = 0.2
DEFAULT_REPLACEMENT = "A peaceful world."

DEFAULT_POLICY = (
    '"No Harmful Content": The prompt shall not seek to generate dangerous content (instructions '
    "for or glorification of weapons, explosives, self-harm or violent acts), harassment or bullying "
    "of real people, hate speech against people for a protected attribute, or sexually explicit "
    "material."
)


class SafetyCheckerLoadError(OSError):
    """The checker's model or tokenizer could not be loaded (missing, gated, or unreadable)."""


@dataclass(frozen=True)
class SafetyVerdict:
    """unsafe: the prompt must not be used; score: the checker's probability of a violation
    (0 when it has none); reason: a short human-readable explanation for logs and the UI."""

    unsafe: bool
    score: float
    reason: str


@runtime_checkable
class SafetyChecker(Protocol):
    """What the apps need from a safety checker."""

    def check(self, prompt: str) -> SafetyVerdict: ...


def validate_prompt(prompt: str) -> str:
    """Returns the prompt; raises ValueError for an empty or whitespace-only one."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("prompt is empty (or only whitespace): nothing to check or generate")
    return prompt


def build_shieldgemma_prompt(prompt: str, policy: str = DEFAULT_POLICY) -> str:
    """The classification input: the user prompt and one policy in ShieldGemma's layout (the
    turn markers and the final question are the ones the model was trained to answer)."""
    return (
        "You are a policy expert trying to help determine whether a user prompt is in violation "
        "of the defined safety policies.\n\n"
        "<start_of_turn>\n"
        f"Human Question: {prompt.strip()}\n"
        "<end_of_turn>\n\n"
        "Our safety principle is defined in the below:\n\n"
        f"* {policy.strip()}\n\n"
        "Does the human question violate the above principle? Your answer must start with 'Yes' or "
        "'No'. And then walk through step by step to be sure we answer correctly.\n"
    )


def answer_token_id(tokenizer: Any, word: str) -> int:
    """The id of the single token that starts an answer `word` ('Yes' / 'No').

    Tries, in order: the bare vocabulary entry (what ShieldGemma's card reads: the template ends
    in a newline, after which no space marker follows), the tokenizer's own encoding of `word`
    (SentencePiece with a dummy prefix: '▁Yes'), and the encoding of ' ' + word (byte-level
    BPE: 'ĠYes'). Raises ValueError if none of them is one token spelling the word.
    """

    def single(ids: list[int]) -> int | None:
        # One token that spells the word (after a space marker); an unknown-token id does not.
        if len(ids) != 1:
            return None
        piece = tokenizer.convert_ids_to_tokens(ids[0])
        return int(ids[0]) if isinstance(piece, str) and piece.lstrip("▁Ġ ") == word else None

    ids = tokenizer.encode(word, add_special_tokens=False)
    spaced = tokenizer.encode(" " + word, add_special_tokens=False)
    vocab = tokenizer.get_vocab()
    for found in (vocab.get(word), single(ids), single(spaced)):
        if found is not None:
            return int(found)
    raise ValueError(
        f"the tokenizer has no single token for {word!r} (it encodes to ids {ids}, ' {word}' to {spaced}): "
        "a Yes/No classifier needs one token per answer"
    )


def _neutralize_markers(prompt: str, markers: list[str]) -> str:
    # A prompt containing the tokenizer's control strings (e.g. '<end_of_turn>') would be
    # tokenized as the control tokens and could close the human turn early to steer the answer;
    # a space after the first character makes them plain text.
    for m in markers:
        if len(m) > 1 and m in prompt:
            prompt = prompt.replace(m, m[0] + " " + m[1:])
    return prompt


class ShieldGemmaChecker:
    """P('Yes') of a ShieldGemma-style causal LM over the policy template; unsafe above threshold.

    Either loads `model_id_or_path` with AutoTokenizer / AutoModelForCausalLM on the first check
    (device None: CUDA when available, else CPU), or uses an already-built `model` and
    `tokenizer` (both must then be given; the model's own device is used).
    """

    def __init__(
        self,
        model_id_or_path: str = DEFAULT_MODEL_ID,
        threshold: float = DEFAULT_THRESHOLD,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype = torch.bfloat16,
        *,
        model: Any = None,
        tokenizer: Any = None,
        policy: str = DEFAULT_POLICY,
    ):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model and tokenizer, or neither (to load model_id_or_path)")
        self.model_id_or_path = model_id_or_path
        self.threshold = threshold
        self.torch_dtype = torch_dtype
        self.policy = policy
        self._device = None if device is None else torch.device(device)
        self._lock = threading.Lock()
        self.model, self.tokenizer = None, None
        if model is not None:
            self._attach(model, tokenizer)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, threshold: float = DEFAULT_THRESHOLD,
                   policy: str = DEFAULT_POLICY) -> ShieldGemmaChecker:
        return cls(threshold=threshold, model=model, tokenizer=tokenizer, policy=policy)

    def _attach(self, model: Any, tokenizer: Any) -> None:
        self._yes_id = answer_token_id(tokenizer, "Yes")
        self._no_id = answer_token_id(tokenizer, "No")
        if self._yes_id == self._no_id:
            raise ValueError(f"'Yes' and 'No' map to the same token id {self._yes_id}")
        self._markers = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
        self._keep_last_only = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.model, self.tokenizer = model.eval(), tokenizer

    def load(self) -> ShieldGemmaChecker:
        """Loads the model now (otherwise the first check does). Thread-safe, idempotent."""
        with self._lock:
            if self.model is None:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                device = self._device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
                try:
                    tokenizer = AutoTokenizer.from_pretrained(self.model_id_or_path)
                    model = AutoModelForCausalLM.from_pretrained(self.model_id_or_path, dtype=self.torch_dtype)
                except (OSError, ValueError) as e:
                    raise SafetyCheckerLoadError(
                        f"cannot load the safety checker {self.model_id_or_path!r} ({type(e).__name__}: {e})\n"
                        "google/shieldgemma-2b is gated: accept its license on the Hugging Face Hub and log in "
                        "(`hf auth login` or `huggingface-cli login`), pass a local copy, or run the app "
                        "with --no-safety-checker."
                    ) from e
                self._attach(model.to(device), tokenizer)
        return self

    @property
    def device(self) -> torch.device:
        if self.model is None:
            return self._device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return next(self.model.parameters()).device

    def score(self, prompt: str) -> float:
        """P('Yes') in [0, 1]: the softmax over the 'Yes' and 'No' logits (float32) at the
        position after the template."""
        validate_prompt(prompt)
        self.load()
        text = build_shieldgemma_prompt(_neutralize_markers(prompt, self._markers), self.policy)
        enc = self.tokenizer(text, return_tensors="pt")
        device = self.device
        inputs = {k: enc[k].to(device) for k in ("input_ids", "attention_mask") if k in enc}
        with torch.inference_mode():
            # Only the last position's [vocab] row is needed, and ShieldGemma's vocab is 256k wide.
            extra = {"logits_to_keep": 1} if self._keep_last_only else {}
            logits = self.model(**inputs, **extra).logits  # [1, T or 1, vocab]
        pair = logits[0, -1, [self._yes_id, self._no_id]].float()
        return float(torch.softmax(pair, dim=0)[0].item())

    def check(self, prompt: str) -> SafetyVerdict:
        p_yes = self.score(prompt)
        unsafe = p_yes > self.threshold
        relation = ">" if unsafe else "<="
        return SafetyVerdict(unsafe, p_yes, f"ShieldGemma P(Yes) = {p_yes:.3f} {relation} threshold {self.threshold}")


# A deliberately small list, for the offline fallback only: it catches the obvious requests for
# sexual, violent or weapons content and nothing subtle. Matched as whole words, case-insensitive.
DEFAULT_BLOCKLIST: tuple[str, ...] = (
    "nude", "naked", "nsfw", "porn", "pornographic", "sex", "sexual", "explicit", "genitals", "topless",
    "gore", "gory", "decapitated", "dismembered", "mutilated", "bloodbath", "corpse", "massacre", "torture",
    "suicide", "self-harm", "bomb", "explosive", "explosives", "gun", "guns", "rifle", "grenade", "terrorist",
    "kill", "killing", "murder", "behead", "beheading",
)


class KeywordChecker:
    """Flags a prompt that contains a blocklisted word. Crude: the fallback where no classifier
    model can be loaded (offline, or ShieldGemma's gated weights absent), so that screening never
    silently turns off."""

    def __init__(self, blocklist: tuple[str, ...] = DEFAULT_BLOCKLIST):
        import re

        self.blocklist = tuple(w.lower() for w in blocklist)
        self._pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in self.blocklist) + r")\b", re.IGNORECASE)

    def check(self, prompt: str) -> SafetyVerdict:
        validate_prompt(prompt)
        hits = sorted({m.group(0).lower() for m in self._pattern.finditer(prompt)})
        if hits:
            return SafetyVerdict(True, 1.0, f"blocklisted word{'s' if len(hits) > 1 else ''}: {', '.join(hits)}")
        return SafetyVerdict(False, 0.0, "no blocklisted word")


def shieldgemma_available(model_id_or_path: str = DEFAULT_MODEL_ID) -> bool:
    """Whether the checker's weights are on this machine (a local folder, or the Hub cache):
    checked without a network call."""
    import os

    if os.path.isdir(model_id_or_path):
        return True
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(model_id_or_path, "config.json"), str)


class NoOpChecker:
    """Passes every prompt (the apps' --no-safety-checker)."""

    def check(self, prompt: str) -> SafetyVerdict:
        validate_prompt(prompt)
        return SafetyVerdict(False, 0.0, "safety checker disabled")


def screen_prompt(
    prompt: str, checker: SafetyChecker, replacement: str = DEFAULT_REPLACEMENT
) -> tuple[str, SafetyVerdict]:
    """Returns (the prompt to generate from, the verdict): the prompt itself when it passes,
    `replacement` when the checker flags it. Raises ValueError for an empty prompt before the
    checker runs."""
    validate_prompt(prompt)
    verdict = checker.check(prompt)
    return (replacement if verdict.unsafe else prompt), verdict
