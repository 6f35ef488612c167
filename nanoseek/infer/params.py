"""SamplingParams: what one request asks of the sampler, with vLLM/OpenAI names and semantics.

Validation runs in `__post_init__`; every error is a ValueError that names the field and the rule.
The processing order of the sampler is fixed (nanoseek/infer/sampler.py): penalties on the raw
logits, then temperature (0 = greedy argmax of the penalized logits), top-k, top-p, min-p.

Numbers must survive the sampler, which computes in float32 and holds top_k in an int64 tensor (a
value that overflows turns a row's distribution into NaN, or fails the whole engine step): floats are
finite and at most 3.4e38 in magnitude, top_p and repetition_penalty are at least 1e-30, top_k fits in
int64, and tiny temperatures follow vLLM (_SAMPLING_EPS, _MAX_TEMP): below 1e-5 they mean greedy,
below 0.01 they are raised to 0.01.
"""

from __future__ import annotations

from dataclasses import dataclass

GREEDY_BELOW = 1e-5             # vLLM's _SAMPLING_EPS: smaller temperatures are greedy (0)
MIN_TEMPERATURE = 1e-2          # vLLM's _MAX_TEMP: other temperatures below it are raised to it
_FLOAT32_MAX = 3.4028234663852886e38
_MIN_POSITIVE = 1e-30           # floor of top_p and repetition_penalty: logits / 1e-30 / 0.01 still fit float32
_INT64_MAX = 2**63 - 1


@dataclass
class SamplingParams:
    """Per-request sampling settings.

    Attributes:
        n: independent samples (each its own sequence and cache slot).
        max_tokens: most tokens to generate per sample; None = up to the engine's max_model_len.
        temperature: 0 = greedy; otherwise logits are divided by it before sampling (as in vLLM,
            values below GREEDY_BELOW become 0, values below MIN_TEMPERATURE become MIN_TEMPERATURE).
        top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1 = off).
        top_k: keep the k most likely tokens (-1 or 0 = off).
        min_p: drop tokens whose probability is below min_p times the most likely one's (0 = off).
        repetition_penalty: HF/vLLM: for tokens in prompt+output, positive logits are divided by it and
            negative ones multiplied (1 = off).
        presence_penalty: OpenAI: subtracted once from the logit of every token already in the output.
        frequency_penalty: OpenAI: subtracted once per occurrence in the output.
        seed: seeds this request's own torch.Generator, so its samples do not depend on what else is in
            the batch (None: drawn from the engine's seeded generator when the request is added).
        stop: strings that end generation; the text is cut before the stop string (finish_reason "stop").
        stop_token_ids: token ids that end generation (the id stays in token_ids, its text does not).
        ignore_eos: keep generating past the end-of-sequence token.
        logprobs: None, or N >= 0: per generated token the logprob of the chosen token plus the top-N.
        prompt_logprobs: None, or N >= 0: the same for every prompt token after the first.
        include_stop_str_in_output: keep the stop string (or stop token text) in the output text.
        skip_special_tokens: drop special tokens (BOS/EOS/role markers) from the output text.
    """

    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()
        if 0.0 < self.temperature < MIN_TEMPERATURE:  # logits divided by less overflow float32
            self.temperature = 0.0 if self.temperature < GREEDY_BELOW else MIN_TEMPERATURE

    def _validate(self) -> None:
        _int("n", self.n, 1)
        if self.max_tokens is not None:
            _int("max_tokens", self.max_tokens, 1)
        _num("temperature", self.temperature, lo=0.0)
        _num("top_p", self.top_p, lo=0.0, lo_open=True, hi=1.0)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not -1 <= self.top_k <= _INT64_MAX:
            raise ValueError(f"SamplingParams.top_k must be an int in [1, 2**63 - 1], or -1/0 to disable it; "
                             f"got {self.top_k!r}")
        _num("min_p", self.min_p, lo=0.0, hi=1.0)
        _num("repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True)
        _num("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        _num("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"SamplingParams.seed must be an int or None; got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"SamplingParams.stop must hold non-empty strings; got {s!r}")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise ValueError(f"SamplingParams.stop_token_ids must hold token ids >= 0; got {t!r}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _int(name, getattr(self, name), 0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def _int(name: str, value, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"SamplingParams.{name} must be an int >= {lo}; got {value!r}")


def _num(name: str, value, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> None:
    """A finite number in the range, small enough in magnitude for float32 (the sampler's dtype)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= _FLOAT32_MAX
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        rule = (f"in {'(' if lo_open else '['}{lo}, {hi}]" if hi is not None
                else f"{'>' if lo_open else '>='} {lo} and at most 3.4e38 (float32)")
        raise ValueError(f"SamplingParams.{name} must be a finite number {rule}; got {value!r}")
    if lo_open and lo == 0.0 and value < _MIN_POSITIVE:
        raise ValueError(f"SamplingParams.{name} must be at least {_MIN_POSITIVE:g} (smaller values round to 0 "
                         f"or overflow the sampler's float32 logits); got {value!r}")
